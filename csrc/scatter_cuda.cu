// CUDA scatter (sum/mean/max/min) and segment softmax. The index is turned into CSR segments (a stable
// device sort unless sorted=True, then searchsorted for row pointers); one thread per (row, feature)
// reduces its segment: no atomics, deterministic results, coalesced reads along the feature axis.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

namespace uae_dist {
namespace {

template <typename scalar_t>
__global__ void segment_reduce_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ perm,
                                      const int64_t* __restrict__ ptr, int64_t rows, int64_t F, int op,
                                      scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = rows * F;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < total; g += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = g / F, f = g % F;
    const int64_t e0 = ptr[r], e1 = ptr[r + 1];
    if (e0 == e1) {
      out[g] = scalar_t(0);
      continue;
    }
    acc_t a = acc_t(src[(perm ? perm[e0] : e0) * F + f]);
    for (int64_t e = e0 + 1; e < e1; ++e) {
      const acc_t v = acc_t(src[(perm ? perm[e] : e) * F + f]);
      if (op <= 1) a += v;
      else if (op == 2) a = (v > a || v != v) ? v : a;
      else a = (v < a || v != v) ? v : a;
    }
    if (op == 1) a /= acc_t(e1 - e0);
    out[g] = scalar_t(a);
  }
}

template <typename scalar_t>
__global__ void segment_softmax_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ perm,
                                       const int64_t* __restrict__ ptr, int64_t rows, int64_t F,
                                       scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = rows * F;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < total; g += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = g / F, f = g % F;
    const int64_t e0 = ptr[r], e1 = ptr[r + 1];
    if (e0 == e1) continue;
    acc_t mx = acc_t(src[(perm ? perm[e0] : e0) * F + f]);
    for (int64_t e = e0 + 1; e < e1; ++e) {
      const acc_t v = acc_t(src[(perm ? perm[e] : e) * F + f]);
      mx = (v > mx || v != v) ? v : mx;
    }
    acc_t sm = 0;
    for (int64_t e = e0; e < e1; ++e) sm += ::exp(acc_t(src[(perm ? perm[e] : e) * F + f]) - mx);
    const acc_t tiny = acc_t(std::numeric_limits<scalar_t>::min());
    const acc_t inv = acc_t(1) / (sm > tiny ? sm : tiny);
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t q = (perm ? perm[e] : e) * F + f;
      out[q] = scalar_t(::exp(acc_t(src[q]) - mx) * inv);
    }
  }
}

struct Segments {
  at::Tensor perm;  // undefined when the index is sorted
  at::Tensor ptr;
};

Segments make_segments(const at::Tensor& index, int64_t dim_size, bool sorted) {
  Segments s;
  at::Tensor sorted_index = index;
  if (index.numel() > 0) {
    auto mm = at::aminmax(index);
    TORCH_CHECK_INDEX(std::get<0>(mm).item<int64_t>() >= 0 && std::get<1>(mm).item<int64_t>() < dim_size,
                      "index out of range for dim_size ", dim_size);
  }
  if (!sorted) {
    auto res = index.sort(/*stable=*/true, 0, false);
    sorted_index = std::get<0>(res);
    s.perm = std::get<1>(res);
  }
  s.ptr = at::searchsorted(sorted_index, at::arange(dim_size + 1, index.options()));
  return s;
}

int op_code(c10::string_view reduce) {
  if (reduce == "sum") return 0;
  if (reduce == "mean") return 1;
  if (reduce == "max") return 2;
  if (reduce == "min") return 3;
  TORCH_CHECK_VALUE(false, "reduce must be one of sum, mean, max, min; got ", reduce);
}

unsigned grid_for(int64_t total, int threads) {
  const int64_t b = (total + threads - 1) / threads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535 * 32));
}

at::Tensor scatter_cuda(const at::Tensor& src_in, const at::Tensor& index_in, int64_t dim_size,
                        c10::string_view reduce, bool sorted) {
  TORCH_CHECK(src_in.dim() >= 1, "src must have at least one dimension");
  TORCH_CHECK(index_in.dim() == 1 && index_in.size(0) == src_in.size(0), "index must be (E,) with E == src.size(0)");
  TORCH_CHECK_VALUE(dim_size >= 0, "dim_size must be non-negative");
  const int op = op_code(reduce);
  const c10::cuda::CUDAGuard guard(src_in.device());
  const at::Tensor src = src_in.contiguous();
  const at::Tensor index = index_in.to(at::kLong).contiguous();
  std::vector<int64_t> shape(src.sizes().begin(), src.sizes().end());
  shape[0] = dim_size;
  at::Tensor out = at::empty(shape, src.options());
  const int64_t E = src.size(0);
  const int64_t F = dim_size > 0 ? out.numel() / dim_size : 0;
  if (out.numel() == 0) return out;
  const Segments seg = make_segments(index, dim_size, sorted);
  const int threads = 256;
  auto stream = at::cuda::getCurrentCUDAStream();
  (void)E;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "uae_scatter_cuda", [&] {
    segment_reduce_kernel<scalar_t><<<grid_for(dim_size * F, threads), threads, 0, stream>>>(
        src.data_ptr<scalar_t>(), seg.perm.defined() ? seg.perm.data_ptr<int64_t>() : nullptr,
        seg.ptr.data_ptr<int64_t>(), dim_size, F, op, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor segment_softmax_cuda(const at::Tensor& src_in, const at::Tensor& index_in, int64_t dim_size, bool sorted) {
  TORCH_CHECK(src_in.dim() >= 1, "src must have at least one dimension");
  TORCH_CHECK(index_in.dim() == 1 && index_in.size(0) == src_in.size(0), "index must be (E,) with E == src.size(0)");
  TORCH_CHECK_VALUE(dim_size >= 0, "dim_size must be non-negative");
  const c10::cuda::CUDAGuard guard(src_in.device());
  const at::Tensor src = src_in.contiguous();
  const at::Tensor index = index_in.to(at::kLong).contiguous();
  at::Tensor out = at::empty_like(src, at::MemoryFormat::Contiguous);
  const int64_t E = src.size(0);
  if (E == 0 || src.numel() == 0) return out;
  const int64_t F = src.numel() / E;
  const Segments seg = make_segments(index, dim_size, sorted);
  const int threads = 256;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "uae_softmax_cuda", [&] {
    segment_softmax_kernel<scalar_t><<<grid_for(dim_size * F, threads), threads, 0, stream>>>(
        src.data_ptr<scalar_t>(), seg.perm.defined() ? seg.perm.data_ptr<int64_t>() : nullptr,
        seg.ptr.data_ptr<int64_t>(), dim_size, F, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(uae_dist, CUDA, m) {
  m.impl("scatter", &scatter_cuda);
  m.impl("segment_softmax", &segment_softmax_cuda);
}

}  // namespace uae_dist
