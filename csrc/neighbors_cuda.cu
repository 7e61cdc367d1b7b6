// CUDA periodic neighbour list for a whole batch of structures: one thread per centre atom i runs the
// same pruned search over images as the CPU brute-force path (neighbors_common.h) for every j of its
// structure. A count pass and a fill pass (each a single launch for the batch) write the output
// already sorted by (i, j, shift): j ascends in the loop and, for fixed (i, j), images come in
// lexicographic order. max_neighbors is applied afterwards with ATen sorts on the device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "neighbors_common.h"

namespace uae_dist {
namespace {

__global__ void prep_struct_kernel(const double* cell, const bool* pbc, double cutoff, int64_t B, StructInfo* S) {
  const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (b < B) prep_struct(cell + 9 * b, pbc + 3 * b, cutoff, S[b]);
}

__global__ void wrap_kernel(const double* pos, const int64_t* sid, const StructInfo* S, int64_t N, double* W,
                            int64_t* O) {
  const int64_t a = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (a >= N) return;
  double f[3];
  wrap_atom(S[sid[a]], pos + 3 * a, W + 3 * a, f, O + 3 * a);
}

template <bool kFill>
__global__ void pairs_kernel(const StructInfo* S, const double* W, const int64_t* O, const int64_t* sid,
                             const int64_t* ptr, int64_t N, double cutoff, int64_t* count, const int64_t* offset,
                             int64_t* out_i, int64_t* out_j, int64_t* out_s, double* out_d2) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int64_t b = sid[i];
  const StructInfo& T = S[b];
  const double wi[3] = {W[3 * i], W[3 * i + 1], W[3 * i + 2]};
  int64_t e = kFill ? offset[i] : 0;
  int64_t n = 0;
  for (int64_t j = ptr[b]; j < ptr[b + 1]; ++j) {
    const double wj[3] = {W[3 * j], W[3 * j + 1], W[3 * j + 2]};
    const int64_t o0 = O[3 * i] - O[3 * j], o1 = O[3 * i + 1] - O[3 * j + 1], o2 = O[3 * i + 2] - O[3 * j + 2];
    pair_images(T, wi, wj, i == j, cutoff, [&](int64_t s0, int64_t s1, int64_t s2, double d2) {
      if (kFill) {
        out_i[e] = i;
        out_j[e] = j;
        out_s[3 * e] = s0 + o0;
        out_s[3 * e + 1] = s1 + o1;
        out_s[3 * e + 2] = s2 + o2;
        if (out_d2) out_d2[e] = d2;
        ++e;
      } else {
        ++n;
      }
    });
  }
  if (!kFill) count[i] = n;
}

inline unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> neighbor_list_cuda(
    const at::Tensor& pos_in, const at::Tensor& cell_in, const at::Tensor& pbc_in,
    const std::optional<at::Tensor>& batch_in, double cutoff, std::optional<int64_t> max_neighbors,
    int64_t /*method*/) {
  TORCH_CHECK_VALUE(cutoff > 0, "cutoff must be positive, got ", cutoff);
  TORCH_CHECK_VALUE(!max_neighbors.has_value() || *max_neighbors >= 1, "max_neighbors must be >= 1");
  TORCH_CHECK(pos_in.dim() == 2 && pos_in.size(1) == 3, "pos must be (N, 3)");
  const c10::cuda::CUDAGuard guard(pos_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor pos = pos_in.to(at::kDouble).contiguous();
  const int64_t N = pos.size(0);
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
    if (N > 0) {
      TORCH_CHECK_VALUE((sid.slice(0, 1) >= sid.slice(0, 0, N - 1)).all().item<bool>(), "batch must be sorted");
      TORCH_CHECK_INDEX(sid.min().item<int64_t>() >= 0 && sid.max().item<int64_t>() < B, "batch id out of range");
    }
    ptr = at::searchsorted(sid, at::arange(B + 1, lopts));
  } else {
    TORCH_CHECK(cell.numel() == 9, "cell must be (3, 3) (or (1, 3, 3)) without batch");
    TORCH_CHECK(pbc.numel() == 3, "pbc must have 3 entries without batch");
    cell = cell.reshape({1, 3, 3});
    pbc = pbc.reshape({1, 3});
    sid = at::zeros({N}, lopts);
    ptr = at::tensor({int64_t(0), N}, lopts.device(at::kCPU)).to(pos.device());
  }
  pbc = pbc.contiguous();
  if (B > 0) {
    const at::Tensor bad = pbc.any(1).logical_and(at::linalg_det(cell).abs() < kSingularDet);
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), "periodic structure with a singular cell");
  }
  at::Tensor info = at::empty({B * (int64_t)sizeof(StructInfo)}, pos.options().dtype(at::kByte));
  StructInfo* S = reinterpret_cast<StructInfo*>(info.data_ptr<uint8_t>());
  const int threads = 128;
  if (B > 0) {
    prep_struct_kernel<<<blocks_for(B, threads), threads, 0, stream>>>(cell.data_ptr<double>(), pbc.data_ptr<bool>(),
                                                                       cutoff, B, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor W = at::empty({N, 3}, pos.options());
  at::Tensor O = at::empty({N, 3}, lopts);
  if (N > 0) {
    wrap_kernel<<<blocks_for(N, threads), threads, 0, stream>>>(pos.data_ptr<double>(), sid.data_ptr<int64_t>(), S, N,
                                                               W.data_ptr<double>(), O.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor count = at::zeros({N}, lopts);
  if (N > 0) {
    pairs_kernel<false><<<blocks_for(N, threads), threads, 0, stream>>>(
        S, W.data_ptr<double>(), O.data_ptr<int64_t>(), sid.data_ptr<int64_t>(), ptr.data_ptr<int64_t>(), N, cutoff,
        count.data_ptr<int64_t>(), nullptr, nullptr, nullptr, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor incl = count.cumsum(0);
  const int64_t E = N > 0 ? incl[N - 1].item<int64_t>() : 0;
  at::Tensor offset = incl - count;
  at::Tensor ti = at::empty({E}, lopts), tj = at::empty({E}, lopts), ts = at::empty({E, 3}, lopts);
  const bool cap = max_neighbors.has_value();
  at::Tensor d2 = cap ? at::empty({E}, pos.options()) : at::Tensor();
  if (E > 0) {
    pairs_kernel<true><<<blocks_for(N, threads), threads, 0, stream>>>(
        S, W.data_ptr<double>(), O.data_ptr<int64_t>(), sid.data_ptr<int64_t>(), ptr.data_ptr<int64_t>(), N, cutoff,
        nullptr, offset.data_ptr<int64_t>(), ti.data_ptr<int64_t>(), tj.data_ptr<int64_t>(), ts.data_ptr<int64_t>(),
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
    const at::Tensor idx = keep.nonzero().squeeze(1);
    ti = ti.index_select(0, idx);
    tj = tj.index_select(0, idx);
    ts = ts.index_select(0, idx);
  }
  return {ti, tj, ts};
}

}  // namespace

TORCH_LIBRARY_IMPL(uae_dist, CUDA, m) { m.impl("neighbor_list", &neighbor_list_cuda); }

}  // namespace uae_dist
