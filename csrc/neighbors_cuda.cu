// CUDA periodic neighbour list for a whole batch of structures: one thread per centre atom i runs the
// same pruned search over images as the CPU brute-force path (neighbors_common.h) for every j of its
// structure. A count pass and a fill pass (each a single launch for the batch) write the output
// already sorted by (i, j, shift): j ascends in the loop and, for fixed (i, j), images come in
// lexicographic order. The fill pass never writes past its centre's counted slots. max_neighbors is
// applied afterwards with ATen sorts on the device.
//
// Host synchronisation: one copy of (edge count, error flags) after the count pass, which the output
// size needs anyway (plus one more for max_neighbors). Input errors (singular periodic cell, unsorted
// or out-of-range batch ids) are flagged on the device by the same code that the CPU path runs and
// raised after that copy; flagged structures are skipped by every kernel before then.
//
// Cost and the cell list: each centre tests every atom of its structure (n per centre, n^2 per
// structure, a few image candidates per pair once the cell exceeds the cutoff sphere). A cell list
// tests about the 27 bins around a centre, (3 r)^3 / (4/3 pi r^3) = 6.4 times its neighbour count,
// and pays for binning and irregular reads; brute force wins in tests while n < ~6.4 x neighbours
// per atom (about 1,600 atoms per structure at 250 neighbours per atom, 8 A in dense cells; MP
// structures have at most a few hundred atoms). There is no CUDA cell list for that reason; the
// measured crossover comes from `benchmarks/neighbors.py --scaling` on a GPU (scripts/gpu_check.sh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "neighbors_common.h"

#if defined(CUDA_KERNEL_ASSERT_MSG)
#define UAE_KERNEL_ASSERT(cond, msg) CUDA_KERNEL_ASSERT_MSG(cond, msg)
#else
#define UAE_KERNEL_ASSERT(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif

namespace uae_dist {
namespace {

// Error flags (one int on the device, or-ed by the kernels, read once by the host).
constexpr int kFlagSingular = 1;
constexpr int kFlagBatchOrder = 2;
constexpr int kFlagBatchRange = 4;
constexpr int kFlagShiftRange = 8;  // compact output only: a shift outside int8

__global__ void prep_struct_kernel(const double* cell, const bool* pbc, double cutoff, int64_t B,
                                   StructInfo* S, int* flags) {
  const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (b >= B) return;
  prep_struct(cell + 9 * b, pbc + 3 * b, cutoff, S[b]);
  if (!S[b].ok) atomicOr(flags, kFlagSingular);
}

__global__ void check_batch_kernel(const int64_t* sid, int64_t N, int64_t B, int* flags) {
  const int64_t a = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (a >= N) return;
  const int64_t b = sid[a];
  if (b < 0 || b >= B) atomicOr(flags, kFlagBatchRange);
  if (a > 0 && sid[a - 1] > b) atomicOr(flags, kFlagBatchOrder);
}

// Structure of atom a, or -1 when its batch id is out of range or its cell was flagged singular.
__device__ __forceinline__ int64_t usable_struct(const int64_t* sid, const StructInfo* S, int64_t B,
                                                 int64_t a) {
  const int64_t b = sid[a];
  return (b >= 0 && b < B && S[b].ok) ? b : -1;
}

__global__ void wrap_kernel(const double* pos, const int64_t* sid, const StructInfo* S, int64_t B,
                            int64_t N, double* W, int64_t* O) {
  const int64_t a = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (a >= N) return;
  const int64_t b = usable_struct(sid, S, B, a);
  if (b < 0) return;
  double f[3];
  wrap_atom(S[b], pos + 3 * a, W + 3 * a, f, O + 3 * a);
}

// kFill = false: count[i] = number of hits. kFill = true: write them to [offset[i], offset[i] +
// count[i]), never beyond (the two passes run the same code, but a write bound does not rely on it).
template <bool kFill>
__global__ void pairs_kernel(const StructInfo* S, int64_t B, const double* W, const int64_t* O,
                             const int64_t* sid, const int64_t* ptr, int64_t N, double cutoff,
                             bool compact, int* flags, int64_t* count, const int64_t* offset, int64_t* out_i, int64_t* out_j,
                             int64_t* out_s, double* out_d2) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int64_t b = usable_struct(sid, S, B, i);
  if (b < 0) {
    if (!kFill) count[i] = 0;
    return;
  }
  const StructInfo& T = S[b];
  const double wi[3] = {W[3 * i], W[3 * i + 1], W[3 * i + 2]};
  int64_t e = kFill ? offset[i] : 0;
  const int64_t end = kFill ? e + count[i] : 0;
  int64_t n = 0;
  bool wide = false;
  for (int64_t j = ptr[b]; j < ptr[b + 1]; ++j) {
    const double wj[3] = {W[3 * j], W[3 * j + 1], W[3 * j + 2]};
    const int64_t o0 = O[3 * i] - O[3 * j], o1 = O[3 * i + 1] - O[3 * j + 1];
    const int64_t o2 = O[3 * i + 2] - O[3 * j + 2];
    pair_images(T, wi, wj, i == j, cutoff, [&](int64_t s0, int64_t s1, int64_t s2, double d2) {
      if (kFill) {
        if (e < end) {
          out_i[e] = i;
          out_j[e] = j;
          out_s[3 * e] = s0 + o0;
          out_s[3 * e + 1] = s1 + o1;
          out_s[3 * e + 2] = s2 + o2;
          if (out_d2) out_d2[e] = d2;
        }
        ++e;
      } else {
        ++n;
        if (compact) {
          const int64_t m = max(max(abs(s0 + o0), abs(s1 + o1)), abs(s2 + o2));
          wide |= m > 127;
        }
      }
    });
  }
  if (kFill) {
    UAE_KERNEL_ASSERT(e == end, "uae_dist neighbor_list: count and fill passes disagree");
  } else {
    count[i] = n;
    if (wide) atomicOr(flags, kFlagShiftRange);
  }
}

inline unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> neighbor_list_cuda(
    const at::Tensor& pos_in, const at::Tensor& cell_in, const at::Tensor& pbc_in,
    const std::optional<at::Tensor>& batch_in, double cutoff, std::optional<int64_t> max_neighbors,
    int64_t /*method*/, bool compact) {
  TORCH_CHECK_VALUE(cutoff > 0, "cutoff must be positive, got ", cutoff);
  TORCH_CHECK_VALUE(!max_neighbors.has_value() || *max_neighbors >= 1, "max_neighbors must be >= 1");
  TORCH_CHECK(pos_in.dim() == 2 && pos_in.size(1) == 3, "pos must be (N, 3)");
  const c10::cuda::CUDAGuard guard(pos_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor pos = pos_in.to(at::kDouble).contiguous();
  const int64_t N = pos.size(0);
  TORCH_CHECK_VALUE(!compact || N <= INT32_MAX, "compact output needs fewer than 2^31 atoms");
  auto lopts = pos.options().dtype(at::kLong);
  at::Tensor cell = cell_in.to(pos.device(), at::kDouble).contiguous();
  at::Tensor pbc = pbc_in.to(pos.device(), at::kBool);
  at::Tensor sid, ptr;
  int64_t B = 1;
  if (batch_in.has_value()) {
    TORCH_CHECK(cell.dim() == 3 && cell.size(1) == 3 && cell.size(2) == 3, "batched cell must be (B, 3, 3)");
    B = cell.size(0);
    if (pbc.dim() == 1) pbc = pbc.unsqueeze(0).expand({B, 3});
    TORCH_CHECK(pbc.dim() == 2 && pbc.size(0) == B && pbc.size(1) == 3, "batched pbc must be (B, 3)");
    sid = batch_in->to(pos.device(), at::kLong).contiguous();
    TORCH_CHECK(sid.dim() == 1 && sid.size(0) == N, "batch must be (N,)");
    // unsorted ids give a non-monotone ptr: the kernels then loop over nothing (no stray reads),
    // and check_batch_kernel's flag raises below
    ptr = at::searchsorted(sid, at::arange(B + 1, lopts));
  } else {
    TORCH_CHECK(cell.numel() == 9, "cell must be (3, 3) (or (1, 3, 3)) without batch");
    TORCH_CHECK(pbc.numel() == 3, "pbc must have 3 entries without batch");
    cell = cell.reshape({1, 3, 3});
    pbc = pbc.reshape({1, 3});
    sid = at::zeros({N}, lopts);
    ptr = at::arange(2, lopts) * N;  // {0, N} without a host-to-device copy
  }
  pbc = pbc.contiguous();
  at::Tensor flags = at::zeros({1}, pos.options().dtype(at::kInt));
  int* fl = flags.data_ptr<int>();
  at::Tensor info = at::empty({B * (int64_t)sizeof(StructInfo)}, pos.options().dtype(at::kByte));
  StructInfo* S = reinterpret_cast<StructInfo*>(info.data_ptr<uint8_t>());
  const int threads = 128;
  if (B > 0) {
    prep_struct_kernel<<<blocks_for(B, threads), threads, 0, stream>>>(
        cell.data_ptr<double>(), pbc.data_ptr<bool>(), cutoff, B, S, fl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor W = at::zeros({N, 3}, pos.options());
  at::Tensor O = at::zeros({N, 3}, lopts);
  at::Tensor count = at::zeros({N}, lopts);
  if (N > 0) {
    const unsigned nb = blocks_for(N, threads);
    check_batch_kernel<<<nb, threads, 0, stream>>>(sid.data_ptr<int64_t>(), N, B, fl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    wrap_kernel<<<nb, threads, 0, stream>>>(pos.data_ptr<double>(), sid.data_ptr<int64_t>(), S, B, N,
                                           W.data_ptr<double>(), O.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pairs_kernel<false><<<nb, threads, 0, stream>>>(
        S, B, W.data_ptr<double>(), O.data_ptr<int64_t>(), sid.data_ptr<int64_t>(),
        ptr.data_ptr<int64_t>(), N, cutoff, compact, fl, count.data_ptr<int64_t>(), nullptr,
        nullptr, nullptr, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor incl = count.cumsum(0);
  // the one host synchronisation: total edge count and the error flags together
  const at::Tensor total = N > 0 ? incl.slice(0, N - 1, N) : at::zeros({1}, lopts);
  const at::Tensor head = at::cat({total, flags.to(at::kLong)}).cpu();
  const int64_t E = head[0].item<int64_t>();
  const int64_t bad = head[1].item<int64_t>();
  TORCH_CHECK_VALUE(!(bad & kFlagSingular), "periodic structure with a singular cell");
  TORCH_CHECK_INDEX(!(bad & kFlagBatchRange), "batch id out of range for ", B, " cells");
  TORCH_CHECK_VALUE(!(bad & kFlagBatchOrder), "batch must be sorted");
  TORCH_CHECK_VALUE(!(bad & kFlagShiftRange),
                    "compact output: a shift does not fit in int8 (use compact=False)");
  at::Tensor offset = incl - count;
  at::Tensor ti = at::empty({E}, lopts), tj = at::empty({E}, lopts), ts = at::empty({E, 3}, lopts);
  const bool cap = max_neighbors.has_value();
  at::Tensor d2 = cap ? at::empty({E}, pos.options()) : at::Tensor();
  if (E > 0) {
    pairs_kernel<true><<<blocks_for(N, threads), threads, 0, stream>>>(
        S, B, W.data_ptr<double>(), O.data_ptr<int64_t>(), sid.data_ptr<int64_t>(),
        ptr.data_ptr<int64_t>(), N, cutoff, compact, fl, count.data_ptr<int64_t>(),
        offset.data_ptr<int64_t>(),
        ti.data_ptr<int64_t>(), tj.data_ptr<int64_t>(), ts.data_ptr<int64_t>(),
        cap ? d2.data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (cap && E > 0) {
    // == neighbors_ref.cap_mask: per centre, the k-th smallest distance + TIE_TOL is the limit.
    const int64_t k = *max_neighbors;
    const at::Tensor d = d2.sqrt();
    const at::Tensor p1 = std::get<1>(d.sort(/*stable=*/true, 0, false));
    const at::Tensor p2 = std::get<1>(ti.index_select(0, p1).sort(/*stable=*/true, 0, false));
    const at::Tensor d_sorted = d.index_select(0, p1.index_select(0, p2));
    const at::Tensor kth = (offset + at::clamp_max(count, k) - 1).clamp(0, E - 1);
    const at::Tensor limit = d_sorted.index_select(0, kth) + kTieTol;
    const at::Tensor keep = d <= limit.index_select(0, ti);
    const at::Tensor idx = keep.nonzero().squeeze(1);  // second host sync (output size)
    ti = ti.index_select(0, idx);
    tj = tj.index_select(0, idx);
    ts = ts.index_select(0, idx);
  }
  if (compact) {
    // int32 / int8 as on CPU (computed in int64 here: the GPU is not bound by the output size)
    return {ti.to(at::kInt), tj.to(at::kInt), ts.to(at::kChar)};
  }
  return {ti, tj, ts};
}

}  // namespace

TORCH_LIBRARY_IMPL(uae_dist, CUDA, m) { m.impl("neighbor_list", &neighbor_list_cuda); }

}  // namespace uae_dist
