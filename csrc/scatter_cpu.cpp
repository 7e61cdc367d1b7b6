// CPU scatter (sum/mean/max/min) and segment softmax.
//
// One pass over the index checks bounds, counts rows and detects a sorted (non-decreasing) index.
// Sorted index (edges grouped by receiver): CSR segments, output rows reduced in parallel.
// Unsorted index: edges are streamed in order and each task owns a range of output rows (it reads the
// whole index but only its rows' features), so there are no atomics and no sort.
// Both give a fixed, deterministic summation order (edge order) whatever the number of threads
// (at::parallel_for, i.e. torch.get_num_threads()); inner loops run over the contiguous feature axis.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace uae_dist {
namespace {

struct CSR {
  std::vector<int64_t> ptr;
  std::vector<int64_t> perm;  // empty when the index is already sorted
  bool sorted = true;
};

CSR build_csr(const at::Tensor& index, int64_t dim_size, bool make_perm = true) {
  const int64_t E = index.numel();
  const int64_t* idx = index.data_ptr<int64_t>();
  CSR c;
  c.ptr.assign(dim_size + 1, 0);
  bool sorted = true;
  int64_t prev = std::numeric_limits<int64_t>::min();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t v = idx[e];
    TORCH_CHECK_INDEX(v >= 0 && v < dim_size, "index ", v, " out of range for dim_size ", dim_size);
    sorted &= v >= prev;
    prev = v;
    c.ptr[v + 1]++;
  }
  for (int64_t r = 0; r < dim_size; ++r) c.ptr[r + 1] += c.ptr[r];
  c.sorted = sorted;
  if (!sorted && make_perm) {
    c.perm.resize(E);
    std::vector<int64_t> fill(c.ptr.begin(), c.ptr.end() - 1);
    for (int64_t e = 0; e < E; ++e) c.perm[fill[idx[e]]++] = e;
  }
  return c;
}

int64_t row_grain(int64_t E, int64_t rows, int64_t F) {
  const int64_t per_row = F * (E / std::max<int64_t>(rows, 1) + 1);
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(per_row, 1));
}

enum Op { kSum = 0, kMean = 1, kMax = 2, kMin = 3 };

// a[f] (+)= x[f] over one row of F features; max/min propagate NaN as torch.scatter_reduce does.
template <typename acc_t, typename scalar_t>
inline void accumulate(Op op, acc_t* a, const scalar_t* x, int64_t F) {
  if (op == kSum || op == kMean) {
    for (int64_t f = 0; f < F; ++f) a[f] += acc_t(x[f]);
  } else if (op == kMax) {
    for (int64_t f = 0; f < F; ++f) {
      const acc_t v = acc_t(x[f]);
      a[f] = (v > a[f] || v != v) ? v : a[f];
    }
  } else {
    for (int64_t f = 0; f < F; ++f) {
      const acc_t v = acc_t(x[f]);
      a[f] = (v < a[f] || v != v) ? v : a[f];
    }
  }
}

template <typename scalar_t>
void scatter_rows(const scalar_t* src, int64_t E, int64_t F, const CSR& c, int64_t rows, Op op, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t* ptr = c.ptr.data();
  const int64_t* perm = c.perm.empty() ? nullptr : c.perm.data();
  at::parallel_for(0, rows, row_grain(E, rows, F), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(F);
    acc_t* a = acc.data();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t e0 = ptr[r], e1 = ptr[r + 1];
      scalar_t* o = out + r * F;
      if (e0 == e1) {
        for (int64_t f = 0; f < F; ++f) o[f] = scalar_t(0);
        continue;
      }
      {
        const scalar_t* x = src + (perm ? perm[e0] : e0) * F;
        for (int64_t f = 0; f < F; ++f) a[f] = acc_t(x[f]);
      }
      for (int64_t e = e0 + 1; e < e1; ++e) accumulate(op, a, src + (perm ? perm[e] : e) * F, F);
      if (op == kMean) {
        const acc_t n = acc_t(e1 - e0);
        for (int64_t f = 0; f < F; ++f) o[f] = scalar_t(a[f] / n);
      } else {
        for (int64_t f = 0; f < F; ++f) o[f] = scalar_t(a[f]);
      }
    }
  });
}

template <typename scalar_t>
void softmax_rows(const scalar_t* src, int64_t E, int64_t F, const CSR& c, int64_t rows, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t* ptr = c.ptr.data();
  const int64_t* perm = c.perm.empty() ? nullptr : c.perm.data();
  at::parallel_for(0, rows, row_grain(E, rows, F), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> mx(F), sm(F);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t e0 = ptr[r], e1 = ptr[r + 1];
      if (e0 == e1) continue;
      {
        const scalar_t* x = src + (perm ? perm[e0] : e0) * F;
        for (int64_t f = 0; f < F; ++f) mx[f] = acc_t(x[f]);
      }
      for (int64_t e = e0 + 1; e < e1; ++e) accumulate(kMax, mx.data(), src + (perm ? perm[e] : e) * F, F);
      std::fill(sm.begin(), sm.end(), acc_t(0));
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t row = perm ? perm[e] : e;
        const scalar_t* x = src + row * F;
        scalar_t* y = out + row * F;
        for (int64_t f = 0; f < F; ++f) {
          const acc_t v = std::exp(acc_t(x[f]) - mx[f]);
          y[f] = scalar_t(v);
          sm[f] += v;
        }
      }
      const acc_t tiny = acc_t(std::numeric_limits<scalar_t>::min());
      for (int64_t f = 0; f < F; ++f) sm[f] = acc_t(1) / std::max(sm[f], tiny);
      for (int64_t e = e0; e < e1; ++e) {
        scalar_t* y = out + (perm ? perm[e] : e) * F;
        for (int64_t f = 0; f < F; ++f) y[f] = scalar_t(acc_t(y[f]) * sm[f]);
      }
    }
  });
}

int64_t stream_tasks(int64_t E, int64_t F, int64_t rows) {
  const int64_t nt = at::get_num_threads();
  if (nt <= 1 || E * F < (1 << 16) || rows < 2) return 1;
  return std::min<int64_t>(nt, rows);
}

// Unsorted index: stream the edges in order; task t owns output rows [rows*t/T, rows*(t+1)/T).
template <typename scalar_t>
void scatter_stream(const scalar_t* src, const int64_t* idx, int64_t E, int64_t F, const int64_t* count,
                    int64_t rows, Op op, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = stream_tasks(E, F, rows);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = rows * t / T, r1 = rows * (t + 1) / T;
      std::vector<acc_t> acc((r1 - r0) * F, acc_t(0));
      std::vector<uint8_t> seen(op >= kMax ? r1 - r0 : 0, 0);
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r = idx[e];
        if (r < r0 || r >= r1) continue;
        acc_t* a = acc.data() + (r - r0) * F;
        const scalar_t* x = src + e * F;
        if (op >= kMax && !seen[r - r0]) {  // the first value of a row starts its max/min
          seen[r - r0] = 1;
          for (int64_t f = 0; f < F; ++f) a[f] = acc_t(x[f]);
        } else {
          accumulate(op, a, x, F);
        }
      }
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t* a = acc.data() + (r - r0) * F;
        scalar_t* o = out + r * F;
        if (op == kMean) {
          const acc_t n = acc_t(std::max<int64_t>(count[r], 1));
          for (int64_t f = 0; f < F; ++f) o[f] = scalar_t(a[f] / n);
        } else {
          for (int64_t f = 0; f < F; ++f) o[f] = scalar_t(a[f]);  // empty rows: 0
        }
      }
    }
  });
}

template <typename scalar_t>
void softmax_stream(const scalar_t* src, const int64_t* idx, int64_t E, int64_t F, int64_t rows, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = stream_tasks(E, F, rows);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = rows * t / T, r1 = rows * (t + 1) / T;
      std::vector<acc_t> mx((r1 - r0) * F), sm((r1 - r0) * F, acc_t(0));
      std::vector<uint8_t> seen(r1 - r0, 0);
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r = idx[e];
        if (r < r0 || r >= r1) continue;
        acc_t* m = mx.data() + (r - r0) * F;
        const scalar_t* x = src + e * F;
        if (!seen[r - r0]) {
          seen[r - r0] = 1;
          for (int64_t f = 0; f < F; ++f) m[f] = acc_t(x[f]);
        } else {
          accumulate(kMax, m, x, F);
        }
      }
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r = idx[e];
        if (r < r0 || r >= r1) continue;
        const acc_t* m = mx.data() + (r - r0) * F;
        acc_t* z = sm.data() + (r - r0) * F;
        const scalar_t* x = src + e * F;
        scalar_t* y = out + e * F;
        for (int64_t f = 0; f < F; ++f) {
          const acc_t v = std::exp(acc_t(x[f]) - m[f]);
          y[f] = scalar_t(v);
          z[f] += v;
        }
      }
      const acc_t tiny = acc_t(std::numeric_limits<scalar_t>::min());
      for (auto& z : sm) z = acc_t(1) / std::max(z, tiny);
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r = idx[e];
        if (r < r0 || r >= r1) continue;
        const acc_t* z = sm.data() + (r - r0) * F;
        scalar_t* y = out + e * F;
        for (int64_t f = 0; f < F; ++f) y[f] = scalar_t(acc_t(y[f]) * z[f]);
      }
    }
  });
}

Op parse_reduce(c10::string_view reduce) {
  if (reduce == "sum") return kSum;
  if (reduce == "mean") return kMean;
  if (reduce == "max") return kMax;
  if (reduce == "min") return kMin;
  TORCH_CHECK_VALUE(false, "reduce must be one of sum, mean, max, min; got ", reduce);
}

void check_inputs(const at::Tensor& src, const at::Tensor& index, int64_t dim_size) {
  TORCH_CHECK(src.dim() >= 1, "src must have at least one dimension");
  TORCH_CHECK(index.dim() == 1 && index.size(0) == src.size(0), "index must be (E,) with E == src.size(0)");
  TORCH_CHECK_VALUE(dim_size >= 0, "dim_size must be non-negative");
  TORCH_CHECK(index.device() == src.device(), "index is on ", index.device(), " but src is on ", src.device());
}

// sorted=True is a promise the CUDA kernels rely on; the CPU pass sees the order for free, so a
// broken promise is an error here too (same contract on every device).
void check_sorted(bool promised, const CSR& c) {
  TORCH_CHECK_VALUE(!promised || c.sorted, "sorted=True but index is not non-decreasing");
}

at::Tensor scatter_cpu(const at::Tensor& src_in, const at::Tensor& index_in, int64_t dim_size,
                       c10::string_view reduce, bool sorted) {
  check_inputs(src_in, index_in, dim_size);
  const Op op = parse_reduce(reduce);
  const at::Tensor src = src_in.contiguous();
  const at::Tensor index = index_in.to(at::kLong).contiguous();
  std::vector<int64_t> shape(src.sizes().begin(), src.sizes().end());
  shape[0] = dim_size;
  at::Tensor out = at::empty(shape, src.options());
  const int64_t E = src.size(0);
  const int64_t F = E > 0 ? src.numel() / E : (dim_size > 0 ? out.numel() / dim_size : 0);
  const CSR c = build_csr(index, dim_size, /*make_perm=*/false);
  check_sorted(sorted, c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "uae_scatter_cpu", [&] {
    if (c.sorted) {
      scatter_rows<scalar_t>(src.data_ptr<scalar_t>(), E, F, c, dim_size, op, out.data_ptr<scalar_t>());
    } else {
      std::vector<int64_t> count(dim_size);
      for (int64_t r = 0; r < dim_size; ++r) count[r] = c.ptr[r + 1] - c.ptr[r];
      scatter_stream<scalar_t>(src.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), E, F, count.data(), dim_size, op,
                               out.data_ptr<scalar_t>());
    }
  });
  return out;
}

at::Tensor segment_softmax_cpu(const at::Tensor& src_in, const at::Tensor& index_in, int64_t dim_size,
                               bool sorted) {
  check_inputs(src_in, index_in, dim_size);
  const at::Tensor src = src_in.contiguous();
  const at::Tensor index = index_in.to(at::kLong).contiguous();
  at::Tensor out = at::empty_like(src, at::MemoryFormat::Contiguous);
  const int64_t E = src.size(0);
  const int64_t F = E > 0 ? src.numel() / E : 0;
  const CSR c = build_csr(index, dim_size, /*make_perm=*/false);
  check_sorted(sorted, c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "uae_softmax_cpu", [&] {
    if (c.sorted) {
      softmax_rows<scalar_t>(src.data_ptr<scalar_t>(), E, F, c, dim_size, out.data_ptr<scalar_t>());
    } else {
      softmax_stream<scalar_t>(src.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), E, F, dim_size,
                               out.data_ptr<scalar_t>());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(uae_dist, CPU, m) {
  m.impl("scatter", &scatter_cpu);
  m.impl("segment_softmax", &segment_softmax_cpu);
}

}  // namespace uae_dist
