// CUDA scatter (sum/mean/max/min) and segment softmax. The index is turned into CSR segments (row
// counts -> cumsum for row pointers, plus a stable device sort unless sorted=True); one thread per
// (row, feature) reduces its segment in edge order: no atomics on values, deterministic results,
// coalesced reads along the feature axis, and no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

// CUDA_KERNEL_ASSERT_MSG is recent; older torch falls back to the message-less assert.
#if defined(CUDA_KERNEL_ASSERT_MSG)
#define UAE_KERNEL_ASSERT(cond, msg) CUDA_KERNEL_ASSERT_MSG(cond, msg)
#else
#define UAE_KERNEL_ASSERT(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif

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

// Index contract, checked on the device (no host sync, like torch's own index kernels): every value
// lies in [0, dim_size), and with sorted=True the index is non-decreasing. A violation is a
// device-side assertion (the CUDA context then reports "device-side assert triggered"); the kernels
// never read out of bounds either way, because row pointers come from counts, not from a search
// that trusts the order.
__global__ void count_rows_kernel(const int64_t* __restrict__ index, int64_t E, int64_t dim_size,
                                  bool sorted, unsigned long long* __restrict__ count) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < E;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t v = index[e];
    const bool in_range = v >= 0 && v < dim_size;
    UAE_KERNEL_ASSERT(in_range, "uae_dist scatter: index out of range for dim_size");
    if (sorted && e > 0) {
      UAE_KERNEL_ASSERT(index[e - 1] <= v, "uae_dist scatter: sorted=True but index decreases");
    }
    if (in_range) atomicAdd(count + v + 1, 1ull);  // count[0] stays 0: ptr = cumsum(count)
  }
}

unsigned grid_for(int64_t total, int threads) {
  const int64_t b = (total + threads - 1) / threads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535 * 32));
}

struct Segments {
  at::Tensor perm;  // undefined when the index is sorted
  at::Tensor ptr;   // (dim_size + 1,) monotone by construction, ptr[dim_size] <= E
};

Segments make_segments(const at::Tensor& index, int64_t dim_size, bool sorted) {
  Segments s;
  const int64_t E = index.numel();
  at::Tensor count = at::zeros({dim_size + 1}, index.options());
  if (E > 0) {
    const int threads = 256;
    count_rows_kernel<<<grid_for(E, threads), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        index.data_ptr<int64_t>(), E, dim_size, sorted,
        reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!sorted) s.perm = std::get<1>(index.sort(/*stable=*/true, 0, false));
  s.ptr = count.cumsum(0);
  return s;
}

int op_code(c10::string_view reduce) {
  if (reduce == "sum") return 0;
  if (reduce == "mean") return 1;
  if (reduce == "max") return 2;
  if (reduce == "min") return 3;
  TORCH_CHECK_VALUE(false, "reduce must be one of sum, mean, max, min; got ", reduce);
}

at::Tensor scatter_cuda(const at::Tensor& src_in, const at::Tensor& index_in, int64_t dim_size,
                        c10::string_view reduce, bool sorted) {
  TORCH_CHECK(src_in.dim() >= 1, "src must have at least one dimension");
  TORCH_CHECK(index_in.dim() == 1 && index_in.size(0) == src_in.size(0), "index must be (E,) with E == src.size(0)");
  TORCH_CHECK_VALUE(dim_size >= 0, "dim_size must be non-negative");
  TORCH_CHECK(index_in.device() == src_in.device(), "index is on ", index_in.device(),
              " but src is on ", src_in.device());
  const int op = op_code(reduce);
  const c10::cuda::CUDAGuard guard(src_in.device());
  const at::Tensor src = src_in.contiguous();
  const at::Tensor index = index_in.to(at::kLong).contiguous();
  std::vector<int64_t> shape(src.sizes().begin(), src.sizes().end());
  shape[0] = dim_size;
  at::Tensor out = at::empty(shape, src.options());
  const int64_t F = dim_size > 0 ? out.numel() / dim_size : 0;
  if (out.numel() == 0) return out;
  const Segments seg = make_segments(index, dim_size, sorted);
  const int threads = 256;
  auto stream = at::cuda::getCurrentCUDAStream();
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
  TORCH_CHECK(index_in.device() == src_in.device(), "index is on ", index_in.device(),
              " but src is on ", src_in.device());
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
