// Geometry shared by the CPU and CUDA periodic neighbour lists (host + device inline code).
//
// Convention (see uae_dist/ops/neighbors_ref.py, the oracle): edge (i, j, shift) means atom j translated
// by shift @ cell lies within cutoff of atom i, vector = pos[j] + shift @ cell - pos[i]. Positions are
// wrapped into the cell along periodic axes (frac - floor(frac)); shifts found between wrapped positions
// are mapped back to positions as given with s = s' + o_i - o_j. The final distance test reproduces the
// oracle's float64 arithmetic ((w_j + s'@cell) - w_i, then x*x + y*y + z*z) so boundary cases agree.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define UAE_HD __host__ __device__ __forceinline__
#else
#define UAE_HD inline
#endif

namespace uae_dist {

constexpr double kTieTol = 1e-6;  // == neighbors_ref.TIE_TOL
constexpr double kSingularDet = 1e-12;

// Unfused multiply / add so that nvcc does not contract into FMA (the oracle has no FMA).
UAE_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
UAE_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// floor/ceil to int64 without a libm call (baseline x86-64 has no SSE4.1 round instruction).
UAE_HD int64_t ifloor(double x) {
  const int64_t t = static_cast<int64_t>(x);
  return t - (static_cast<double>(t) > x);
}
UAE_HD int64_t iceil(double x) {
  const int64_t t = static_cast<int64_t>(x);
  return t + (static_cast<double>(t) < x);
}

struct StructInfo {
  double cell[9];   // row-major, rows are lattice vectors
  double inv[9];    // cell^{-1}: frac = pos @ inv
  double rot[9];    // rows e1, e2, e3: orthonormal frame, e1 || c, e3 normal to the (b, c) plane
  double ra[3], rb[3], rc[3];  // a, b, c in that frame: c = (c1,0,0), b = (b1,b2,0), a = (a1,a2,a3)
  double inv_a3, inv_b2, inv_c1;  // reciprocals of the frame's diagonal
  double eps;       // slack on the pruning bounds (the exact test decides)
  int pbc[3];
  int any_pbc;
  int ok;           // 0: periodic structure with a singular cell
};

UAE_HD double dot3(const double* a, const double* b) { return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]; }
UAE_HD void cross3(const double* a, const double* b, double* o) {
  o[0] = a[1] * b[2] - a[2] * b[1];
  o[1] = a[2] * b[0] - a[0] * b[2];
  o[2] = a[0] * b[1] - a[1] * b[0];
}

UAE_HD void prep_struct(const double* cell, const bool* pbc, double cutoff, StructInfo& S) {
  for (int k = 0; k < 9; ++k) S.cell[k] = cell[k];
  S.any_pbc = 0;
  for (int k = 0; k < 3; ++k) {
    S.pbc[k] = pbc[k] ? 1 : 0;
    S.any_pbc |= S.pbc[k];
  }
  S.ok = 1;
  double norm_sum = 0.0;
  for (int k = 0; k < 3; ++k) norm_sum += sqrt(dot3(cell + 3 * k, cell + 3 * k));
  S.eps = 1e-9 * (1.0 + cutoff + norm_sum);
  for (int k = 0; k < 9; ++k) {
    S.inv[k] = (k % 4 == 0) ? 1.0 : 0.0;
    S.rot[k] = (k % 4 == 0) ? 1.0 : 0.0;
  }
  for (int k = 0; k < 3; ++k) S.ra[k] = S.rb[k] = S.rc[k] = 0.0;
  S.inv_a3 = S.inv_b2 = S.inv_c1 = 1.0;
  if (!S.any_pbc) return;  // cell unused: no images, positions as given
  const double* A = cell;
  const double* B = cell + 3;
  const double* C = cell + 6;
  double bc[3], ca[3], ab[3];
  cross3(B, C, bc);
  cross3(C, A, ca);
  cross3(A, B, ab);
  const double det = dot3(A, bc);
  if (!(fabs(det) >= kSingularDet)) {
    S.ok = 0;
    return;
  }
  // inv[r][c]: columns of inv are the reciprocal vectors (b x c)/det, (c x a)/det, (a x b)/det
  for (int r = 0; r < 3; ++r) {
    S.inv[3 * r + 0] = bc[r] / det;
    S.inv[3 * r + 1] = ca[r] / det;
    S.inv[3 * r + 2] = ab[r] / det;
  }
  double e1[3], e2[3], e3[3];
  const double cn = sqrt(dot3(C, C));
  const double bcn = sqrt(dot3(bc, bc));
  for (int k = 0; k < 3; ++k) {
    e1[k] = C[k] / cn;
    e3[k] = bc[k] / bcn;
  }
  if (dot3(A, e3) < 0) for (int k = 0; k < 3; ++k) e3[k] = -e3[k];
  cross3(e3, e1, e2);
  if (dot3(B, e2) < 0) for (int k = 0; k < 3; ++k) e2[k] = -e2[k];
  for (int k = 0; k < 3; ++k) {
    S.rot[k] = e1[k];
    S.rot[3 + k] = e2[k];
    S.rot[6 + k] = e3[k];
  }
  S.ra[0] = dot3(A, e1); S.ra[1] = dot3(A, e2); S.ra[2] = dot3(A, e3);
  S.rb[0] = dot3(B, e1); S.rb[1] = dot3(B, e2); S.rb[2] = 0.0;
  S.rc[0] = cn;          S.rc[1] = 0.0;         S.rc[2] = 0.0;
  S.inv_a3 = 1.0 / S.ra[2];
  S.inv_b2 = 1.0 / S.rb[1];
  S.inv_c1 = 1.0 / S.rc[0];
}

// Wrap one position into the cell along periodic axes: w = (frac - o) @ cell with o = floor(frac).
UAE_HD void wrap_atom(const StructInfo& S, const double* p, double* w, double* f, int64_t* o) {
  if (!S.any_pbc) {
    for (int k = 0; k < 3; ++k) {
      w[k] = p[k];
      f[k] = p[k];
      o[k] = 0;
    }
    return;
  }
  double fr[3];
  for (int k = 0; k < 3; ++k) {
    const double frac = p[0] * S.inv[k] + p[1] * S.inv[3 + k] + p[2] * S.inv[6 + k];
    const double fl = S.pbc[k] ? floor(frac) : 0.0;
    o[k] = static_cast<int64_t>(fl);
    fr[k] = frac - fl;
    f[k] = fr[k];
  }
  for (int k = 0; k < 3; ++k) w[k] = fr[0] * S.cell[k] + fr[1] * S.cell[3 + k] + fr[2] * S.cell[6 + k];
}

// Oracle-exact squared distance between wrapped w_i and image s of wrapped w_j.
UAE_HD double image_d2(const StructInfo& S, const double* wi, const double* wj, double s0, double s1, double s2) {
  double d2 = 0.0;
  for (int k = 0; k < 3; ++k) {
    const double sv = add_rn(add_rn(mul_rn(s0, S.cell[k]), mul_rn(s1, S.cell[3 + k])), mul_rn(s2, S.cell[6 + k]));
    const double v = add_rn(add_rn(wj[k], sv), -wi[k]);
    d2 = add_rn(d2, mul_rn(v, v));
  }
  return d2;
}

// Smallest |x| over the interval [lo, hi].
UAE_HD double min_abs(double lo, double hi) { return lo > 0 ? lo : (hi < 0 ? -hi : 0.0); }

// Enumerate, in lexicographic order, the images s' whose translate s'@cell can bring a difference
// vector D from the box [Dlo, Dhi] (coordinates in the triangular frame, D = rot (w_j - w_i)) within
// R of the origin: row(s0, s1, lo2, hi2) is called for every (s0, s1) row that meets the sphere,
// with the row's s2 range clipped to it. The frame components of v = D + s'@cell are
// v3 = D3 + s0 a3, v2 = D2 + s0 a2 + s1 b2, v1 = D1 + s0 a1 + s1 b1 + s2 c1: each depends on one
// coordinate of D only, so the bounds are exact for a box (a point is a box too) up to the slack eps.
template <class Row>
UAE_HD void image_rows(const StructInfo& S, const double* Dlo, const double* Dhi, double cutoff,
                       Row&& row) {
  const double a1 = S.ra[0], a2 = S.ra[1], a3 = S.ra[2], b1 = S.rb[0], b2 = S.rb[1];
  const double inv_a3 = S.inv_a3, inv_b2 = S.inv_b2, inv_c1 = S.inv_c1, eps = S.eps;
  const bool pbc0 = S.pbc[0], pbc1 = S.pbc[1], pbc2 = S.pbc[2];
  const double R = cutoff + eps;
  const double R2 = R * R;
  int64_t lo0 = 0, hi0 = 0;
  if (pbc0) {
    lo0 = iceil((-R - Dhi[2]) * inv_a3);
    hi0 = ifloor((R - Dlo[2]) * inv_a3);
  }
  for (int64_t s0 = lo0; s0 <= hi0; ++s0) {
    const double v3 = min_abs(Dlo[2] + s0 * a3, Dhi[2] + s0 * a3);
    const double rem0 = R2 - v3 * v3;
    if (rem0 < 0) continue;
    const double r0 = sqrt(rem0) + eps;
    const double lo_2 = Dlo[1] + s0 * a2, hi_2 = Dhi[1] + s0 * a2;
    int64_t lo1 = 0, hi1 = 0;
    if (pbc1) {
      lo1 = iceil((-r0 - hi_2) * inv_b2);
      hi1 = ifloor((r0 - lo_2) * inv_b2);
    }
    for (int64_t s1 = lo1; s1 <= hi1; ++s1) {
      const double v2 = min_abs(lo_2 + s1 * b2, hi_2 + s1 * b2);
      const double rem1 = rem0 - v2 * v2;
      if (rem1 < 0) continue;
      const double r1 = sqrt(rem1) + eps;
      const double lo_1 = Dlo[0] + s0 * a1 + s1 * b1, hi_1 = Dhi[0] + s0 * a1 + s1 * b1;
      int64_t lo2 = 0, hi2 = 0;
      if (pbc2) {
        lo2 = iceil((-r1 - hi_1) * inv_c1);
        hi2 = ifloor((r1 - lo_1) * inv_c1);
      } else if (min_abs(lo_1, hi_1) > r1) {
        continue;
      }
      if (lo2 <= hi2) row(s0, s1, lo2, hi2);
    }
  }
}

// Frame coordinates rot @ v (see StructInfo).
UAE_HD void to_frame(const StructInfo& S, const double* v, double* f) {
  for (int k = 0; k < 3; ++k) f[k] = S.rot[3 * k] * v[0] + S.rot[3 * k + 1] * v[1] + S.rot[3 * k + 2] * v[2];
}

// Image vector s'@cell, in the oracle's order of operations.
UAE_HD void image_vec(const StructInfo& S, double s0, double s1, double s2, double* sv) {
  for (int k = 0; k < 3; ++k)
    sv[k] = add_rn(add_rn(mul_rn(s0, S.cell[k]), mul_rn(s1, S.cell[3 + k])), mul_rn(s2, S.cell[6 + k]));
}

// Every image s' of atom j (wrapped frame) within cutoff of atom i, in lexicographic order of s'
// (one pair at a time: the CUDA kernel's search). emit(s0, s1, s2, d2) with d2 from image_d2.
template <class Emit>
UAE_HD void pair_images(const StructInfo& S, const double* wi, const double* wj, bool same, double cutoff,
                        Emit&& emit) {
  const double cut2 = cutoff * cutoff;
  const double dc[3] = {wj[0] - wi[0], wj[1] - wi[1], wj[2] - wi[2]};
  double D[3];
  to_frame(S, dc, D);
  image_rows(S, D, D, cutoff, [&](int64_t s0, int64_t s1, int64_t lo2, int64_t hi2) {
    const bool zero01 = same && s0 == 0 && s1 == 0;
    for (int64_t s2 = lo2; s2 <= hi2; ++s2) {
      if (zero01 && s2 == 0) continue;
      const double d2 = image_d2(S, wi, wj, (double)s0, (double)s1, (double)s2);
      if (d2 <= cut2) emit(s0, s1, s2, d2);
    }
  });
}

}  // namespace uae_dist
