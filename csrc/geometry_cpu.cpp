// CPU edge lengths |pos[j] + shift @ cell - pos[i]| of a batch's stored edges, for narrowing graphs
// to a shorter cutoff while loading (uae_dist/data/batched.py).
//
// The same arithmetic, in the same order, as the NumPy reference (uae_dist/ops/neighbors_ref.py::
// edge_lengths_numpy; built with -ffp-contract=off), so both give the same bits and a loader keeps
// the same edges with or without the extension. One thread on purpose: it runs in loader workers
// and beside training ranks, where intra-op threads only compete for the same cores.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace uae_dist {
namespace {

void check(const at::Tensor& t, const char* name, at::ScalarType dt, int64_t dim) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "edge_lengths: ", name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.scalar_type() == dt, "edge_lengths: ", name, " must be ", dt, ", got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, "edge_lengths: ", name, " must have ", dim, " dims, got ",
                    t.sizes());
}

at::Tensor edge_lengths_cpu(const at::Tensor& pos_, const at::Tensor& cell_, const at::Tensor& i_,
                            const at::Tensor& j_, const at::Tensor& shift_,
                            const at::Tensor& nedges_) {
  check(pos_, "pos (N,3)", at::kDouble, 2);
  check(cell_, "cell (B,3,3)", at::kDouble, 3);
  check(i_, "i (E,)", at::kLong, 1);
  check(j_, "j (E,)", at::kLong, 1);
  check(shift_, "shift (E,3)", at::kLong, 2);
  check(nedges_, "nedges (B,)", at::kLong, 1);
  const int64_t N = pos_.size(0), B = cell_.size(0), E = i_.size(0);
  TORCH_CHECK_VALUE(pos_.size(1) == 3 && cell_.size(1) == 3 && cell_.size(2) == 3,
                    "edge_lengths: pos must be (N,3) and cell (B,3,3)");
  TORCH_CHECK_VALUE(j_.size(0) == E && shift_.size(0) == E && shift_.size(1) == 3,
                    "edge_lengths: i, j and shift must describe the same E edges");
  TORCH_CHECK_VALUE(nedges_.size(0) == B, "edge_lengths: nedges must have one count per cell");
  const auto pos = pos_.contiguous(), cell = cell_.contiguous(), i = i_.contiguous(),
             j = j_.contiguous(), shift = shift_.contiguous(), nedges = nedges_.contiguous();
  const double* P = pos.data_ptr<double>();
  const double* C = cell.data_ptr<double>();
  const int64_t *I = i.data_ptr<int64_t>(), *J = j.data_ptr<int64_t>();
  const int64_t *S = shift.data_ptr<int64_t>(), *NE = nedges.data_ptr<int64_t>();
  at::Tensor out = at::empty({E}, pos.options());
  double* d = out.data_ptr<double>();
  int64_t e = 0;
  for (int64_t g = 0; g < B; ++g) {
    TORCH_CHECK_VALUE(NE[g] >= 0 && NE[g] <= E - e, "edge_lengths: nedges must sum to E=", E);
    const double* c = C + 9 * g;  // row k of cell g at c[3k]
    for (const int64_t end = e + NE[g]; e < end; ++e) {
      const int64_t a = I[e], b = J[e];
      TORCH_CHECK_INDEX(uint64_t(a) < uint64_t(N) && uint64_t(b) < uint64_t(N),
                        "edge_lengths: edge ", e, " (", a, ", ", b, ") outside the ", N, " atoms");
      const double s0 = double(S[3 * e]), s1 = double(S[3 * e + 1]), s2 = double(S[3 * e + 2]);
      const double* pa = P + 3 * a;
      const double* pb = P + 3 * b;
      const double vx = pb[0] + (s0 * c[0] + s1 * c[3] + s2 * c[6]) - pa[0];
      const double vy = pb[1] + (s0 * c[1] + s1 * c[4] + s2 * c[7]) - pa[1];
      const double vz = pb[2] + (s0 * c[2] + s1 * c[5] + s2 * c[8]) - pa[2];
      d[e] = vx * vx + vy * vy + vz * vz;
    }
  }
  TORCH_CHECK_VALUE(e == E, "edge_lengths: nedges sum to ", e, ", not to the E=", E, " edges");
  for (int64_t k = 0; k < E; ++k) d[k] = std::sqrt(d[k]);  // a separate pass: vectorised
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(uae_dist, CPU, m) { m.impl("edge_lengths", &edge_lengths_cpu); }

}  // namespace uae_dist
