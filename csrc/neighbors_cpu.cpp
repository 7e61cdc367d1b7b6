// CPU periodic neighbour list: per structure either an image-major brute force (small cells, long
// cutoffs: the usual case for crystals) or a cell list (binning, linear in atoms) for large cells.
// Parallel (at::parallel_for -> OpenMP, honours torch.get_num_threads()) across structures and atoms.
//
// Brute force, per centre i: the images s' that can bring any atom of the structure within the
// cutoff are enumerated once (image_rows over the box spanned by all atoms), and for each image the
// distances to all n atoms are computed in one branch-free loop over structure-of-arrays positions
// (vectorised), then compacted. A pair-by-pair search pays its pruning per (i, j) pair; here it is
// paid per (i, s') and the inner loop is a plain SIMD sweep. Hits are put in (j, s') order by a
// stable counting sort on j. The distance is the oracle's float64 expression, (w_j + s'@cell) - w_i.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <cmath>
#include <numeric>
#include <vector>

#include "neighbors_common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace uae_dist {
namespace {

struct Grid {
  int64_t n[3] = {1, 1, 1};  // bins per axis
  int64_t r[3] = {0, 0, 0};  // bin search radius per axis
  int64_t R[3] = {0, 0, 0};  // bound on |s'| (sort key)
  double fmin[3] = {0, 0, 0};
  double scale[3] = {1, 1, 1};  // bins per unit fractional coordinate
  std::vector<int64_t> start;  // (nbins + 1) CSR over bins
  std::vector<int64_t> atoms;  // local atom ids sorted by bin
  std::vector<int64_t> bin;    // (n_atoms, 3) bin coordinates
};

struct Structure {
  StructInfo S;
  int64_t p0 = 0, p1 = 0;
  bool use_cell = false;
  Grid grid;
  // brute force: wrapped positions as structure of arrays, and their box in the triangular frame
  std::vector<double> x, y, z;
  double flo[3] = {0, 0, 0}, fhi[3] = {0, 0, 0};
};

void prep_brute(const double* W, Structure& T) {
  const int64_t n = T.p1 - T.p0;
  T.x.resize(n);
  T.y.resize(n);
  T.z.resize(n);
  for (int k = 0; k < 3; ++k) {
    T.flo[k] = INFINITY;
    T.fhi[k] = -INFINITY;
  }
  for (int64_t a = 0; a < n; ++a) {
    const double* w = W + 3 * (T.p0 + a);
    T.x[a] = w[0];
    T.y[a] = w[1];
    T.z[a] = w[2];
    double f[3];
    to_frame(T.S, w, f);
    for (int k = 0; k < 3; ++k) {
      T.flo[k] = std::min(T.flo[k], f[k]);
      T.fhi[k] = std::max(T.fhi[k], f[k]);
    }
  }
}

// Grid with bins at least `cutoff` thick along each plane normal (fractional coordinates).
void plan_grid(const StructInfo& S, const double* frac, int64_t n_atoms, double cutoff, Grid& g) {
  const double c = cutoff * (1.0 + 1e-9);
  double bnorm[3];
  for (int k = 0; k < 3; ++k)
    bnorm[k] = std::sqrt(S.inv[k] * S.inv[k] + S.inv[3 + k] * S.inv[3 + k] + S.inv[6 + k] * S.inv[6 + k]);
  double span[3];
  for (int k = 0; k < 3; ++k) {
    if (S.pbc[k]) {
      g.fmin[k] = 0.0;
      span[k] = 1.0;
    } else {
      double lo = INFINITY, hi = -INFINITY;
      for (int64_t a = 0; a < n_atoms; ++a) {
        lo = std::min(lo, frac[3 * a + k]);
        hi = std::max(hi, frac[3 * a + k]);
      }
      g.fmin[k] = n_atoms ? lo : 0.0;
      span[k] = n_atoms ? hi - lo : 0.0;
    }
    const double thickness = span[k] / bnorm[k];  // Å along the plane normal
    g.n[k] = std::max<int64_t>(1, std::min<double>(std::floor(thickness / c), 1 << 20));
  }
  const int64_t max_bins = std::max<int64_t>(27, 2 * n_atoms);
  while (g.n[0] * g.n[1] * g.n[2] > max_bins) {
    int k = 0;
    for (int q = 1; q < 3; ++q)
      if (g.n[q] > g.n[k]) k = q;
    g.n[k] = std::max<int64_t>(1, g.n[k] / 2);
  }
  for (int k = 0; k < 3; ++k) {
    if (span[k] <= 0) {
      g.n[k] = 1;
      g.r[k] = 0;
      g.scale[k] = 0.0;
    } else {
      g.scale[k] = g.n[k] / span[k];
      g.r[k] = static_cast<int64_t>(std::ceil(c * bnorm[k] * g.scale[k] + 1e-9));
    }
    g.R[k] = S.pbc[k] ? g.r[k] / g.n[k] + 2 : 0;
  }
}

void build_grid(const double* frac, int64_t n_atoms, Grid& g) {
  const int64_t nb = g.n[0] * g.n[1] * g.n[2];
  g.bin.resize(3 * n_atoms);
  g.start.assign(nb + 1, 0);
  g.atoms.resize(n_atoms);
  std::vector<int64_t> flat(n_atoms);
  for (int64_t a = 0; a < n_atoms; ++a) {
    for (int k = 0; k < 3; ++k) {
      int64_t b = static_cast<int64_t>(std::floor((frac[3 * a + k] - g.fmin[k]) * g.scale[k]));
      g.bin[3 * a + k] = std::min(std::max<int64_t>(b, 0), g.n[k] - 1);
    }
    flat[a] = (g.bin[3 * a] * g.n[1] + g.bin[3 * a + 1]) * g.n[2] + g.bin[3 * a + 2];
    g.start[flat[a] + 1]++;
  }
  for (int64_t b = 0; b < nb; ++b) g.start[b + 1] += g.start[b];
  std::vector<int64_t> fill(g.start.begin(), g.start.end() - 1);
  for (int64_t a = 0; a < n_atoms; ++a) g.atoms[fill[flat[a]]++] = a;
}

// Growable hit buffers (malloc/realloc, no zero fill); handed to the output tensors without a copy when
// a single chunk did all the work.
struct HitBuf {
  int64_t* j = nullptr;
  int64_t* s = nullptr;  // 3 per hit
  double* d2 = nullptr;  // only with max_neighbors
  int64_t n = 0, cap = 0;
  bool need_d = false;
  std::vector<int64_t> count;  // hits per atom of the chunk
  // scratch for sorting / capping
  std::vector<int64_t> key, perm, tmp_i;
  std::vector<double> tmp_d;

  HitBuf() = default;
  HitBuf(const HitBuf&) = delete;
  HitBuf& operator=(const HitBuf&) = delete;
  HitBuf(HitBuf&& o) noexcept { *this = std::move(o); }
  HitBuf& operator=(HitBuf&& o) noexcept {
    std::swap(j, o.j); std::swap(s, o.s); std::swap(d2, o.d2);
    n = o.n; cap = o.cap; need_d = o.need_d;
    count = std::move(o.count);
    return *this;
  }
  ~HitBuf() { std::free(j); std::free(s); std::free(d2); }

  void reserve(int64_t c) {
    if (c <= cap) return;
    j = static_cast<int64_t*>(std::realloc(j, sizeof(int64_t) * c));
    s = static_cast<int64_t*>(std::realloc(s, 3 * sizeof(int64_t) * c));
    d2 = static_cast<double*>(std::realloc(d2, sizeof(double) * c));  // always: need_d may change
    TORCH_CHECK(j && s && d2, "neighbor_list: out of memory (", c, " pairs)");
    cap = c;
  }
  void grow(int64_t extra) {
    if (n + extra > cap) reserve(std::max<int64_t>(n + extra, 2 * cap));
  }
  // after grow(): no capacity check (centre_search); i is implied by the caller
  inline void put(int64_t /*i*/, int64_t jj, int64_t a, int64_t b, int64_t c, double dd) {
    j[n] = jj;
    s[3 * n] = a;
    s[3 * n + 1] = b;
    s[3 * n + 2] = c;
    d2[n] = dd;
    ++n;
  }
  inline void push(int64_t jj, int64_t a, int64_t b, int64_t c, double dd) {
    if (n == cap) reserve(std::max<int64_t>(1024, 2 * cap));
    j[n] = jj;
    s[3 * n] = a;
    s[3 * n + 1] = b;
    s[3 * n + 2] = c;
    if (need_d) d2[n] = dd;
    ++n;
  }
};

// Sort the hits [h0, n) by key (cell-list path).
void sort_hits(HitBuf& B, int64_t h0) {
  const int64_t m = B.n - h0;
  B.perm.resize(m);
  std::iota(B.perm.begin(), B.perm.end(), 0);
  const int64_t* key = B.key.data();
  std::sort(B.perm.begin(), B.perm.end(), [key](int64_t a, int64_t b) { return key[a] < key[b]; });
  B.tmp_i.assign(B.j + h0, B.j + B.n);
  for (int64_t q = 0; q < m; ++q) B.j[h0 + q] = B.tmp_i[B.perm[q]];
  B.tmp_i.assign(B.s + 3 * h0, B.s + 3 * B.n);
  for (int64_t q = 0; q < m; ++q)
    for (int k = 0; k < 3; ++k) B.s[3 * (h0 + q) + k] = B.tmp_i[3 * B.perm[q] + k];
  if (B.need_d) {
    B.tmp_d.assign(B.d2 + h0, B.d2 + B.n);
    for (int64_t q = 0; q < m; ++q) B.d2[h0 + q] = B.tmp_d[B.perm[q]];
  }
}

// Keep the k nearest plus everything within kTieTol of the k-th distance (== neighbors_ref.cap_mask,
// with distances d = sqrt(d2) as the oracle computes them). Order is preserved.
void cap_hits(HitBuf& B, int64_t h0, int64_t k) {
  const int64_t m = B.n - h0;
  if (k < 0 || m <= k) return;
  B.tmp_d.resize(m);
  for (int64_t q = 0; q < m; ++q) B.tmp_d[q] = std::sqrt(B.d2[h0 + q]);
  std::nth_element(B.tmp_d.begin(), B.tmp_d.begin() + (k - 1), B.tmp_d.end());
  const double limit = B.tmp_d[k - 1] + kTieTol;
  int64_t w = h0;
  for (int64_t q = h0; q < B.n; ++q) {
    if (std::sqrt(B.d2[q]) <= limit) {
      B.j[w] = B.j[q];
      B.d2[w] = B.d2[q];
      for (int c = 0; c < 3; ++c) B.s[3 * w + c] = B.s[3 * q + c];
      ++w;
    }
  }
  B.n = w;
}

// Cell-list search for atom i (global index) of structure T; hits appended to Bf sorted by (j, shift),
// capped to max_neighbors when kcap >= 0.
void cell_search(const Structure& T, int64_t i, const double* W, const int64_t* O, double cutoff, int64_t kcap,
                 HitBuf& Bf) {
  const StructInfo& S = T.S;
  const double* wi = W + 3 * i;
  const double cut2 = cutoff * cutoff;
      const int64_t oi0 = O[3 * i], oi1 = O[3 * i + 1], oi2 = O[3 * i + 2];
      const int64_t h0 = Bf.n;
      const Grid& g = T.grid;
      const int64_t li = i - T.p0;
      const int64_t* bi = &g.bin[3 * li];
      const int64_t W1 = 2 * g.R[1] + 1, W2 = 2 * g.R[2] + 1, W0 = 2 * g.R[0] + 1;
      Bf.key.clear();
      for (int64_t d0 = -g.r[0]; d0 <= g.r[0]; ++d0) {
        int64_t c0x = bi[0] + d0, s0 = 0;
        if (S.pbc[0]) {
          const int64_t m = ((c0x % g.n[0]) + g.n[0]) % g.n[0];
          s0 = (c0x - m) / g.n[0];
          c0x = m;
        } else if (c0x < 0 || c0x >= g.n[0]) {
          continue;
        }
        for (int64_t d1 = -g.r[1]; d1 <= g.r[1]; ++d1) {
          int64_t c1x = bi[1] + d1, s1 = 0;
          if (S.pbc[1]) {
            const int64_t m = ((c1x % g.n[1]) + g.n[1]) % g.n[1];
            s1 = (c1x - m) / g.n[1];
            c1x = m;
          } else if (c1x < 0 || c1x >= g.n[1]) {
            continue;
          }
          for (int64_t d2i = -g.r[2]; d2i <= g.r[2]; ++d2i) {
            int64_t c2x = bi[2] + d2i, s2 = 0;
            if (S.pbc[2]) {
              const int64_t m = ((c2x % g.n[2]) + g.n[2]) % g.n[2];
              s2 = (c2x - m) / g.n[2];
              c2x = m;
            } else if (c2x < 0 || c2x >= g.n[2]) {
              continue;
            }
            const int64_t fb = (c0x * g.n[1] + c1x) * g.n[2] + c2x;
            const bool zero = s0 == 0 && s1 == 0 && s2 == 0;
            for (int64_t q = g.start[fb]; q < g.start[fb + 1]; ++q) {
              const int64_t lj = g.atoms[q];
              const int64_t j = T.p0 + lj;
              if (zero && j == i) continue;
              const double d2 = image_d2(S, wi, W + 3 * j, (double)s0, (double)s1, (double)s2);
              if (d2 <= cut2) {
                Bf.push(j, s0 + oi0 - O[3 * j], s1 + oi1 - O[3 * j + 1], s2 + oi2 - O[3 * j + 2], d2);
                Bf.key.push_back(((lj * W0 + s0 + g.R[0]) * W1 + s1 + g.R[1]) * W2 + s2 + g.R[2]);
              }
            }
          }
        }
      }
  sort_hits(Bf, h0);
  if (kcap >= 0) cap_hits(Bf, h0, kcap);
}

// Recycles output blocks between calls. The data builder calls the op once per structure in a loop;
// each call's ~100 kB outputs would otherwise go through malloc/free, which gets slow once the caller's
// heap is fragmented (e.g. after parsing thousands of CIFs). Blocks return here when their tensors die.
class BlockCache {
 public:
  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();  // never destroyed: tensors may outlive static teardown
    return *cache;
  }
  static int size_class(size_t bytes) {
    int k = 12;
    while ((size_t(1) << k) < bytes) ++k;
    return k;
  }
  // A block of at least 2^k bytes: a cached one of class k or k + 1 (k is updated to the class
  // taken: give() it back with that), else a fresh one. Fresh memory costs a page fault and a zeroed
  // page per 4 KiB on first write, ~25x the write itself: batched outputs of varying size reuse the
  // next class up rather than fault in a new block.
  void* take(int& k) {
    if (k < kMaxClass) {
      std::lock_guard<std::mutex> g(mu_);
      for (int c = k; c <= k + 1 && c < kMaxClass; ++c) {
        auto& v = free_[c];
        if (!v.empty()) {
          void* p = v.back();
          v.pop_back();
          cached_ -= size_t(1) << c;
          k = c;
          return p;
        }
      }
    }
    return std::malloc(size_t(1) << k);
  }
  void give(void* p, int k) {
    if (k < kMaxClass) {
      std::lock_guard<std::mutex> g(mu_);
      const size_t bytes = size_t(1) << k;
      if (free_[k].size() < 4 && cached_ + bytes <= kMaxCached) {
        free_[k].push_back(p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }

 private:
  static constexpr int kMaxClass = 27;                 // blocks up to 64 MiB ...
  static constexpr size_t kMaxCached = size_t(192) << 20;  // ... and at most 192 MiB kept in all
  std::mutex mu_;
  std::vector<void*> free_[kMaxClass];
  size_t cached_ = 0;
};

at::Tensor pooled_tensor(void* p, int k, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::from_blob(p, sizes, [k](void* q) { BlockCache::get().give(q, k); }, opts);
}

// An uninitialised (rows, cols) tensor of elem_size-byte elements in a recycled block.
at::Tensor pooled_empty(int64_t rows, int64_t cols, size_t elem_size, const at::TensorOptions& opts) {
  int k = BlockCache::size_class(std::max<size_t>(1, elem_size * rows * cols));
  void* p = BlockCache::get().take(k);
  TORCH_CHECK(p, "neighbor_list: out of memory (", rows, " pairs)");
  if (cols == 1) return pooled_tensor(p, k, {rows}, opts);
  return pooled_tensor(p, k, {rows, cols}, opts);
}


// Distances from w_i to w_j + s'@cell for every candidate image k < npad (npad a multiple of 4),
// the oracle's (w_j + s'@cell) - w_i then x*x + y*y + z*z, into d; hits (d <= cut2) as bits of mask
// (zeroed by the caller). IEEE add/sub/mul in every variant, never contracted: results are
// identical whatever the vector width.
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2"))) void sweep_avx2(const double* w, const double* wi, const double* sx,
                                                const double* sy, const double* sz, int64_t npad,
                                                double cut2, double* d, uint64_t* mask) {
  const __m256d vj0 = _mm256_set1_pd(w[0]), vj1 = _mm256_set1_pd(w[1]), vj2 = _mm256_set1_pd(w[2]);
  const __m256d vi0 = _mm256_set1_pd(wi[0]), vi1 = _mm256_set1_pd(wi[1]), vi2 = _mm256_set1_pd(wi[2]);
  const __m256d vc = _mm256_set1_pd(cut2);
  for (int64_t k = 0; k < npad; k += 4) {
    const __m256d vx = _mm256_sub_pd(_mm256_add_pd(vj0, _mm256_loadu_pd(sx + k)), vi0);
    const __m256d vy = _mm256_sub_pd(_mm256_add_pd(vj1, _mm256_loadu_pd(sy + k)), vi1);
    const __m256d vz = _mm256_sub_pd(_mm256_add_pd(vj2, _mm256_loadu_pd(sz + k)), vi2);
    const __m256d dd = _mm256_add_pd(_mm256_add_pd(_mm256_mul_pd(vx, vx), _mm256_mul_pd(vy, vy)),
                                     _mm256_mul_pd(vz, vz));
    _mm256_storeu_pd(d + k, dd);
    const uint64_t bits = static_cast<uint64_t>(_mm256_movemask_pd(_mm256_cmp_pd(dd, vc, _CMP_LE_OQ)));
    mask[k >> 6] |= bits << (k & 63);
  }
}
const bool kHasAvx2 = __builtin_cpu_supports("avx2");
#else
constexpr bool kHasAvx2 = false;
#endif

void sweep(const double* w, const double* wi, const double* sx, const double* sy, const double* sz,
           int64_t npad, double cut2, double* d, uint64_t* mask) {
#if defined(__x86_64__) || defined(__i386__)
  if (kHasAvx2) return sweep_avx2(w, wi, sx, sy, sz, npad, cut2, d, mask);
#endif
#if defined(__SSE2__)
  const __m128d vj0 = _mm_set1_pd(w[0]), vj1 = _mm_set1_pd(w[1]), vj2 = _mm_set1_pd(w[2]);
  const __m128d vi0 = _mm_set1_pd(wi[0]), vi1 = _mm_set1_pd(wi[1]), vi2 = _mm_set1_pd(wi[2]);
  const __m128d vc = _mm_set1_pd(cut2);
  for (int64_t k = 0; k < npad; k += 2) {
    const __m128d vx = _mm_sub_pd(_mm_add_pd(vj0, _mm_loadu_pd(sx + k)), vi0);
    const __m128d vy = _mm_sub_pd(_mm_add_pd(vj1, _mm_loadu_pd(sy + k)), vi1);
    const __m128d vz = _mm_sub_pd(_mm_add_pd(vj2, _mm_loadu_pd(sz + k)), vi2);
    const __m128d dd =
        _mm_add_pd(_mm_add_pd(_mm_mul_pd(vx, vx), _mm_mul_pd(vy, vy)), _mm_mul_pd(vz, vz));
    _mm_storeu_pd(d + k, dd);
    const uint64_t bits = static_cast<uint64_t>(_mm_movemask_pd(_mm_cmple_pd(dd, vc)));
    mask[k >> 6] |= bits << (k & 63);
  }
#else
  for (int64_t k = 0; k < npad; ++k) {
    const double vx = (w[0] + sx[k]) - wi[0], vy = (w[1] + sy[k]) - wi[1], vz = (w[2] + sz[k]) - wi[2];
    d[k] = vx * vx + vy * vy + vz * vz;
    mask[k >> 6] |= static_cast<uint64_t>(d[k] <= cut2) << (k & 63);
  }
#endif
}

// Per-thread scratch of the image-major search.
struct CentreScratch {
  std::vector<int32_t> img;            // s' of the centre's candidate images, 3 per image
  std::vector<double> svx, svy, svz;   // their vectors s'@cell
  std::vector<double> d2;              // distances of one j to every image
  std::vector<uint64_t> mask;          // which of them are hits, one bit per image
};

// Image-major brute force for centre i (global index) of structure T; hits appended to `out`
// (HitBuf, or the final OutBuf when nothing is capped) sorted by (j, shift). The candidate images (those that can bring any
// atom of the structure within the cutoff) are listed once; then, for each j in ascending order,
// one vectorised sweep over them computes every distance and a branch-free compaction keeps the
// hits, already in lexicographic order of s'.
template <class Out>
void centre_search(const Structure& T, int64_t i, const int64_t* O, double cutoff, CentreScratch& X,
                   Out& out) {
  const StructInfo& S = T.S;
  const int64_t n = T.p1 - T.p0, li = i - T.p0;
  const double wi0 = T.x[li], wi1 = T.y[li], wi2 = T.z[li];
  const double wi[3] = {wi0, wi1, wi2};
  double fi[3], Dlo[3], Dhi[3];
  to_frame(S, wi, fi);
  for (int k = 0; k < 3; ++k) {
    Dlo[k] = T.flo[k] - fi[k];
    Dhi[k] = T.fhi[k] - fi[k];
  }
  X.img.clear();
  X.svx.clear();
  X.svy.clear();
  X.svz.clear();
  int64_t k0 = -1;  // the zero image (self pair excluded there)
  image_rows(S, Dlo, Dhi, cutoff, [&](int64_t s0, int64_t s1, int64_t lo2, int64_t hi2) {
    for (int64_t s2 = lo2; s2 <= hi2; ++s2) {
      if (s0 == 0 && s1 == 0 && s2 == 0) k0 = static_cast<int64_t>(X.svx.size());
      X.img.push_back(static_cast<int32_t>(s0));
      X.img.push_back(static_cast<int32_t>(s1));
      X.img.push_back(static_cast<int32_t>(s2));
      double sv[3];
      image_vec(S, (double)s0, (double)s1, (double)s2, sv);
      X.svx.push_back(sv[0]);
      X.svy.push_back(sv[1]);
      X.svz.push_back(sv[2]);
    }
  });
  const int64_t nimg = static_cast<int64_t>(X.svx.size());
  if (nimg == 0) return;
  // pad to whole SIMD vectors with a far image: its distance is inf, never a hit
  const int64_t npad = (nimg + 3) & ~int64_t(3);
  for (int64_t k = nimg; k < npad; ++k) {
    X.svx.push_back(1e200);
    X.svy.push_back(1e200);
    X.svz.push_back(1e200);
  }
  const int64_t nwords = (npad + 63) / 64;
  X.d2.resize(npad);
  X.mask.resize(nwords);
  const double cut2 = cutoff * cutoff;
  const double* __restrict__ sx = X.svx.data();
  const double* __restrict__ sy = X.svy.data();
  const double* __restrict__ sz = X.svz.data();
  double* __restrict__ d = X.d2.data();
  uint64_t* __restrict__ mask = X.mask.data();
  const int32_t* img = X.img.data();
  const int64_t oi0 = O[3 * i], oi1 = O[3 * i + 1], oi2 = O[3 * i + 2];
  for (int64_t lj = 0; lj < n; ++lj) {
    const double wj[3] = {T.x[lj], T.y[lj], T.z[lj]};
    std::fill(mask, mask + nwords, uint64_t(0));
    sweep(wj, wi, sx, sy, sz, npad, cut2, d, mask);
    if (lj == li && k0 >= 0) mask[k0 >> 6] &= ~(uint64_t(1) << (k0 & 63));
    out.grow(nimg);
    const int64_t j = T.p0 + lj;
    const int64_t o0 = oi0 - O[3 * j], o1 = oi1 - O[3 * j + 1], o2 = oi2 - O[3 * j + 2];
    for (int64_t w = 0; w < nwords; ++w) {  // set bits in ascending k: lexicographic s'
      for (uint64_t bits = mask[w]; bits; bits &= bits - 1) {
        const int64_t k = 64 * w + __builtin_ctzll(bits);
        const int32_t* sp = img + 3 * k;
        out.put(i, j, sp[0] + o0, sp[1] + o1, sp[2] + o2, d[k]);
      }
    }
  }
}

struct Scratch {
  CentreScratch cs;
  HitBuf hb;
};

// Hits of atom i into Bf, sorted by (j, shift) and capped to max_neighbors when kcap >= 0.
void search_atom(const Structure& T, int64_t i, const double* W, const int64_t* O, double cutoff,
                 int64_t kcap, Scratch& X, HitBuf& Bf) {
  Bf.need_d = kcap >= 0;
  if (T.use_cell) {
    cell_search(T, i, W, O, cutoff, kcap, Bf);
  } else {
    const int64_t h0 = Bf.n;
    centre_search(T, i, O, cutoff, X.cs, Bf);
    if (kcap >= 0) cap_hits(Bf, h0, kcap);
  }
}

// Output dtypes: int64 (i, j, shift), or compact: int32 (i, j) and int8 (shift).
template <class I, class Sh>
struct Types {
  static constexpr bool compact = sizeof(Sh) == 1;
  static at::ScalarType index_type() { return compact ? at::kInt : at::kLong; }
  static at::ScalarType shift_type() { return compact ? at::kChar : at::kLong; }
  static bool fits(int64_t v) { return !compact || (v >= -128 && v <= 127); }
};

// Copy m hits of centre i into typed (i, j, s) arrays at row e; false if a shift overflows Sh.
template <class I, class Sh>
bool put_hits(I* oi, I* oj, Sh* os, int64_t e, int64_t i, const int64_t* j, const int64_t* s, int64_t m) {
  std::fill(oi + e, oi + e + m, static_cast<I>(i));
  for (int64_t q = 0; q < m; ++q) oj[e + q] = static_cast<I>(j[q]);
  bool ok = true;
  for (int64_t q = 0; q < 3 * m; ++q) {
    ok &= Types<I, Sh>::fits(s[q]);
    os[3 * e + q] = static_cast<Sh>(s[q]);
  }
  return ok;
}

// Output growing by whole atoms; handed to the tensors without a copy. In `pooled` mode (serial calls)
// the first allocation (the `hint` estimate) comes from BlockCache; outgrowing it moves the data to
// malloc/realloc'd arrays.
template <class I, class Sh>
struct OutBuf {
  I* i = nullptr;
  I* j = nullptr;
  Sh* s = nullptr;
  int64_t n = 0, cap = 0, hint = 0;
  bool pooled = false, ok = true;
  int ki = 0, kj = 0, ks = 0;
  OutBuf() = default;
  OutBuf(const OutBuf&) = delete;
  OutBuf& operator=(const OutBuf&) = delete;
  ~OutBuf() { release(); }
  void release() {
    if (pooled) {
      if (i) BlockCache::get().give(i, ki);
      if (j) BlockCache::get().give(j, kj);
      if (s) BlockCache::get().give(s, ks);
    } else {
      std::free(i);
      std::free(j);
      std::free(s);
    }
    i = j = nullptr;
    s = nullptr;
  }
  void grow(int64_t extra) {
    if (n + extra <= cap) return;
    if (pooled && cap == 0) {
      const int64_t c = std::max<int64_t>({n + extra, hint, 1});
      ki = kj = BlockCache::size_class(sizeof(I) * c);
      ks = BlockCache::size_class(3 * sizeof(Sh) * c);
      i = static_cast<I*>(BlockCache::get().take(ki));
      j = static_cast<I*>(BlockCache::get().take(kj));
      s = static_cast<Sh*>(BlockCache::get().take(ks));
      TORCH_CHECK(i && j && s, "neighbor_list: out of memory (", c, " pairs)");
      cap = std::min<int64_t>((int64_t(1) << std::min(ki, kj)) / sizeof(I),
                              (int64_t(1) << ks) / (3 * sizeof(Sh)));
      return;
    }
    const int64_t c = std::max<int64_t>(n + extra, cap + cap / 2 + 256);
    if (pooled) {  // outgrew the pooled blocks: continue in malloc'd memory
      I* ni = static_cast<I*>(std::malloc(sizeof(I) * c));
      I* nj = static_cast<I*>(std::malloc(sizeof(I) * c));
      Sh* ns = static_cast<Sh*>(std::malloc(3 * sizeof(Sh) * c));
      TORCH_CHECK(ni && nj && ns, "neighbor_list: out of memory (", c, " pairs)");
      std::memcpy(ni, i, sizeof(I) * n);
      std::memcpy(nj, j, sizeof(I) * n);
      std::memcpy(ns, s, 3 * sizeof(Sh) * n);
      release();
      pooled = false;
      i = ni;
      j = nj;
      s = ns;
      cap = c;
      return;
    }
    i = static_cast<I*>(std::realloc(i, sizeof(I) * c));
    j = static_cast<I*>(std::realloc(j, sizeof(I) * c));
    s = static_cast<Sh*>(std::realloc(s, 3 * sizeof(Sh) * c));
    TORCH_CHECK(i && j && s, "neighbor_list: out of memory (", c, " pairs)");
    cap = c;
  }
  // after grow(): no capacity check (centre_search writes here directly when nothing is capped)
  inline void put(int64_t ci, int64_t cj, int64_t a, int64_t b, int64_t c, double /*d2*/) {
    ok &= Types<I, Sh>::fits(a) & Types<I, Sh>::fits(b) & Types<I, Sh>::fits(c);
    i[n] = static_cast<I>(ci);
    j[n] = static_cast<I>(cj);
    s[3 * n] = static_cast<Sh>(a);
    s[3 * n + 1] = static_cast<Sh>(b);
    s[3 * n + 2] = static_cast<Sh>(c);
    ++n;
  }
  void append(int64_t ci, const HitBuf& H) {
    grow(H.n);
    ok &= put_hits<I, Sh>(i, j, s, n, ci, H.j, H.s, H.n);
    n += H.n;
  }
};

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

void check_compact(bool ok) {
  TORCH_CHECK_VALUE(ok, "compact output: a shift does not fit in int8 (use compact=False)");
}

// The output's arrays as (i, j, shift) tensors; the tensors take the blocks over.
template <class I, class Sh>
Triple as_tensors(OutBuf<I, Sh>& o, const at::TensorOptions& opts) {
  const auto it = opts.dtype(Types<I, Sh>::index_type());
  const auto sto = opts.dtype(Types<I, Sh>::shift_type());
  const int64_t E = o.n;
  if (E == 0) return {at::empty({0}, it), at::empty({0}, it), at::empty({0, 3}, sto)};
  at::Tensor ti, tj, ts;
  if (o.pooled) {
    ti = pooled_tensor(o.i, o.ki, {E}, it);
    o.i = nullptr;
    tj = pooled_tensor(o.j, o.kj, {E}, it);
    o.j = nullptr;
    ts = pooled_tensor(o.s, o.ks, {E, 3}, sto);
    o.s = nullptr;
  } else {
    auto freer = [](void* p) { std::free(p); };
    ti = at::from_blob(o.i, {E}, freer, it);
    o.i = nullptr;
    tj = at::from_blob(o.j, {E}, freer, it);
    o.j = nullptr;
    ts = at::from_blob(o.s, {E, 3}, freer, sto);
    o.s = nullptr;
  }
  return {ti, tj, ts};
}

// Whole structures per task (many small structures, or any call too small to be worth threads): the
// working set of a structure stays in cache and the output grows in place.
template <class I, class Sh>
Triple by_structure(const std::vector<Structure>& st, const double* W, const int64_t* O,
                    const std::vector<double>& swork, const std::vector<double>& sexp, int64_t ntasks,
                    double cutoff, int64_t kcap, const at::TensorOptions& opts) {
  const int64_t B = static_cast<int64_t>(st.size());
  ntasks = std::max<int64_t>(1, std::min<int64_t>(ntasks, B));
  // contiguous groups of structures with about equal work
  std::vector<int64_t> lo(ntasks + 1, B);
  lo[0] = 0;
  {
    double total = 0;
    for (double w : swork) total += w;
    double acc = 0;
    int64_t t = 1;
    for (int64_t b = 0; b < B && t < ntasks; ++b) {
      acc += swork[b];
      while (t < ntasks && acc >= total * t / ntasks) lo[t++] = b + 1;
    }
    for (int64_t q = 1; q <= ntasks; ++q) lo[q] = std::max(lo[q], lo[q - 1]);
    lo[ntasks] = B;
  }
  // Every task's output starts in a recycled block (BlockCache) sized by its estimate; task 0's is
  // sized for the whole call, because it becomes the output and the other tasks append to it.
  std::vector<OutBuf<I, Sh>> out(ntasks);
  double total = 0;
  for (int64_t t = 0; t < ntasks; ++t) {
    double e = 0;
    for (int64_t b = lo[t]; b < lo[t + 1]; ++b) e += sexp[b];
    out[t].pooled = true;
    out[t].hint = static_cast<int64_t>(e * 1.3) + 256;
    total += e;
  }
  out[0].hint = static_cast<int64_t>(total * 1.3) + 256;
  auto run = [&](int64_t t) {
    // Scratch survives across calls (one per thread): no large malloc per call.
    static thread_local Scratch X;
    OutBuf<I, Sh>& o = out[t];
    for (int64_t b = lo[t]; b < lo[t + 1]; ++b) {
      const Structure& T = st[b];
      for (int64_t i = T.p0; i < T.p1; ++i) {
        if (!T.use_cell && kcap < 0) {  // straight into the output
          centre_search(T, i, O, cutoff, X.cs, o);
          continue;
        }
        X.hb.n = 0;
        search_atom(T, i, W, O, cutoff, kcap, X, X.hb);
        o.append(i, X.hb);
      }
    }
  };
  if (ntasks == 1) {
    run(0);
  } else {
    at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) run(t);
    });
  }
  for (const auto& o : out) check_compact(o.ok);
  std::vector<int64_t> off(ntasks + 1, 0);
  for (int64_t t = 0; t < ntasks; ++t) off[t + 1] = off[t] + out[t].n;
  OutBuf<I, Sh>& o = out[0];
  o.grow(off[ntasks] - o.n);  // a no-op unless the estimate was short
  auto append = [&](int64_t t) {
    if (!out[t].n) return;
    std::memcpy(o.i + off[t], out[t].i, sizeof(I) * out[t].n);
    std::memcpy(o.j + off[t], out[t].j, sizeof(I) * out[t].n);
    std::memcpy(o.s + 3 * off[t], out[t].s, 3 * sizeof(Sh) * out[t].n);
  };
  if (ntasks <= 2) {
    for (int64_t t = 1; t < ntasks; ++t) append(t);
  } else {
    at::parallel_for(1, ntasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) append(t);
    });
  }
  o.n = off[ntasks];
  return as_tensors(o, opts);
}

// Atoms per task (a few large structures): chunks of atoms search independently into their own hit
// buffers, then every chunk copies its hits to its offset of the output.
template <class I, class Sh>
Triple by_atom(const std::vector<Structure>& st, const std::vector<int64_t>& sid, const double* W,
               const int64_t* O, double cutoff, int64_t kcap, int64_t nchunks,
               const at::TensorOptions& opts) {
  const int64_t N = static_cast<int64_t>(sid.size());
  nchunks = std::max<int64_t>(1, std::min<int64_t>(nchunks, N));
  std::vector<int64_t> chunk_lo(nchunks + 1);
  for (int64_t c = 0; c <= nchunks; ++c) chunk_lo[c] = N * c / nchunks;
  std::vector<HitBuf> buf(nchunks);
  std::vector<int64_t> hit_off(N, 0), cnt(N, 0);
  auto for_chunks = [&](const std::function<void(int64_t)>& f) {
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) f(c);
    });
  };
  for_chunks([&](int64_t c) {
    static thread_local Scratch X;
    HitBuf& Bf = buf[c];
    Bf.n = 0;
    for (int64_t i = chunk_lo[c]; i < chunk_lo[c + 1]; ++i) {
      hit_off[i] = Bf.n;
      search_atom(st[sid[i]], i, W, O, cutoff, kcap, X, Bf);
      cnt[i] = Bf.n - hit_off[i];
    }
  });
  std::vector<int64_t> aoff(N + 1, 0);
  for (int64_t a = 0; a < N; ++a) aoff[a + 1] = aoff[a] + cnt[a];
  const int64_t E = aoff[N];
  const auto it = opts.dtype(Types<I, Sh>::index_type());
  const auto sto = opts.dtype(Types<I, Sh>::shift_type());
  at::Tensor ti = pooled_empty(E, 1, sizeof(I), it), tj = pooled_empty(E, 1, sizeof(I), it);
  at::Tensor ts = pooled_empty(E, 3, sizeof(Sh), sto);
  I* pi = static_cast<I*>(ti.data_ptr());
  I* pj = static_cast<I*>(tj.data_ptr());
  Sh* ps = static_cast<Sh*>(ts.data_ptr());
  std::vector<uint8_t> ok(nchunks, 1);
  for_chunks([&](int64_t c) {
    for (int64_t a = chunk_lo[c]; a < chunk_lo[c + 1]; ++a) {
      const int64_t h0 = hit_off[a];
      ok[c] &= put_hits<I, Sh>(pi, pj, ps, aoff[a], a, buf[c].j + h0, buf[c].s + 3 * h0, cnt[a]);
    }
  });
  for (uint8_t x : ok) check_compact(x);
  return {ti, tj, ts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> neighbor_list_cpu(
    const at::Tensor& pos_in, const at::Tensor& cell_in, const at::Tensor& pbc_in,
    const std::optional<at::Tensor>& batch_in, double cutoff, std::optional<int64_t> max_neighbors,
    int64_t method, bool compact) {
  TORCH_CHECK_VALUE(cutoff > 0, "cutoff must be positive, got ", cutoff);
  TORCH_CHECK_VALUE(method >= 0 && method <= 2, "method must be 0, 1 or 2");
  TORCH_CHECK_VALUE(!max_neighbors.has_value() || *max_neighbors >= 1, "max_neighbors must be >= 1");
  TORCH_CHECK(pos_in.dim() == 2 && pos_in.size(1) == 3, "pos must be (N, 3)");
  const at::Tensor pos = pos_in.to(at::kDouble).contiguous();
  const int64_t N = pos.size(0);
  TORCH_CHECK_VALUE(!compact || N <= INT32_MAX, "compact output needs fewer than 2^31 atoms");
  const bool batched = batch_in.has_value();
  at::Tensor cell = cell_in.to(at::kDouble).contiguous();
  at::Tensor pbc = pbc_in.to(at::kBool);
  int64_t B = 1;
  std::vector<int64_t> ptr;
  if (batched) {
    TORCH_CHECK(cell.dim() == 3 && cell.size(1) == 3 && cell.size(2) == 3, "batched cell must be (B, 3, 3)");
    B = cell.size(0);
    if (pbc.dim() == 1) pbc = pbc.unsqueeze(0).expand({B, 3});
    TORCH_CHECK(pbc.dim() == 2 && pbc.size(0) == B && pbc.size(1) == 3, "batched pbc must be (B, 3)");
    const at::Tensor batch = batch_in->to(at::kLong).contiguous();
    TORCH_CHECK(batch.dim() == 1 && batch.size(0) == N, "batch must be (N,)");
    const int64_t* bp = batch.data_ptr<int64_t>();
    ptr.assign(B + 1, 0);
    for (int64_t a = 0; a < N; ++a) {
      TORCH_CHECK_INDEX(bp[a] >= 0 && bp[a] < B, "batch id ", bp[a], " out of range for ", B, " cells");
      TORCH_CHECK_VALUE(a == 0 || bp[a] >= bp[a - 1], "batch must be sorted");
      ptr[bp[a] + 1]++;
    }
    for (int64_t b = 0; b < B; ++b) ptr[b + 1] += ptr[b];
  } else {
    TORCH_CHECK(cell.numel() == 9, "cell must be (3, 3) (or (1, 3, 3)) without batch");
    TORCH_CHECK(pbc.numel() == 3, "pbc must have 3 entries without batch");
    ptr = {0, N};
  }
  pbc = pbc.contiguous();
  const double* P = pos.data_ptr<double>();
  const double* Cp = cell.data_ptr<double>();
  const bool* PB = pbc.data_ptr<bool>();
  const int64_t kcap = max_neighbors.has_value() ? *max_neighbors : -1;

  // Per structure: frame, wrapped positions, grid.
  std::vector<Structure> st(B);
  std::vector<double> W(3 * N), F(3 * N);
  std::vector<int64_t> O(3 * N);
  auto prep = [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      Structure& T = st[b];
      T.p0 = ptr[b];
      T.p1 = ptr[b + 1];
      prep_struct(Cp + 9 * b, PB + 3 * b, cutoff, T.S);
      if (!T.S.ok) continue;
      for (int64_t a = T.p0; a < T.p1; ++a) wrap_atom(T.S, P + 3 * a, &W[3 * a], &F[3 * a], &O[3 * a]);
      const int64_t n = T.p1 - T.p0;
      if (method != 1 && n > 0) {
        plan_grid(T.S, &F[3 * T.p0], n, cutoff, T.grid);
        if (method == 2) {
          T.use_cell = true;
        } else {
          // Tests per centre: brute force ~ n x images (the images a centre's sphere reaches, about
          // prod(1 + 2 cutoff / plane spacing) along periodic axes), cell list ~ n x the fraction of
          // bins it visits, at ~3x the cost per test (measured: benchmarks/neighbors.py --scaling).
          double ratio = 1.0, images = 1.0;
          for (int k = 0; k < 3; ++k) {
            ratio *= double(2 * T.grid.r[k] + 1) / double(T.grid.n[k]);
            const double bn = std::sqrt(T.S.inv[k] * T.S.inv[k] + T.S.inv[3 + k] * T.S.inv[3 + k] +
                                        T.S.inv[6 + k] * T.S.inv[6 + k]);
            if (T.S.pbc[k]) images *= 1.0 + 2.0 * cutoff * bn;  // bn = 1 / plane spacing
          }
          T.use_cell = n >= 64 && 3.0 * ratio < images;
        }
        if (T.use_cell) build_grid(&F[3 * T.p0], n, T.grid);
      }
      if (!T.use_cell) prep_brute(W.data(), T);
    }
  };
  // a parallel region costs more than preparing a few thousand atoms
  if (N < 8192) {
    prep(0, B);
  } else {
    at::parallel_for(0, B, 8, prep);
  }
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(st[b].S.ok, "periodic structure with a singular cell (structure ", b, ")");

  // structure id of each atom
  std::vector<int64_t> sid(N);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t a = ptr[b]; a < ptr[b + 1]; ++a) sid[a] = b;

  // Work estimate (candidate pairs) decides whether to go parallel at all: a parallel region costs
  // more than a whole small structure.
  const double kPi = 3.14159265358979323846;
  double work = 0.0, expect = 0.0, max_work = 0.0;
  std::vector<double> swork(B), sexp(B);
  for (int64_t b = 0; b < B; ++b) {
    const double n = double(st[b].p1 - st[b].p0);
    double vol = 0.0;
    if (st[b].S.any_pbc) {
      const double* c = st[b].S.cell;
      vol = std::fabs(c[0] * (c[4] * c[8] - c[5] * c[7]) - c[1] * (c[3] * c[8] - c[5] * c[6]) +
                      c[2] * (c[3] * c[7] - c[4] * c[6]));
    }
    const double sphere = 4.0 / 3.0 * kPi * cutoff * cutoff * cutoff;
    const double per_atom = vol > 0 ? n * sphere / vol : n;
    sexp[b] = n * std::min(per_atom, 1e4);
    swork[b] = st[b].use_cell ? n * per_atom * 4.0 : n * n + n * per_atom;
    expect += sexp[b];
    work += swork[b];
    max_work = std::max(max_work, swork[b]);
  }
  const int64_t nthreads = at::get_num_threads();
  // A work unit is ~10 ns (a 64-structure MP batch at 8 Å: ~1.7e5 units, 1.5 ms on one thread): calls
  // under ~0.2 ms stay on one thread. (At 2e5, most MP batches ran serially: 1.5x slower.)
  const bool serial = nthreads == 1 || work <= 2e4;
  const auto opts = pos_in.options();
  const bool whole = serial || (B >= 4 * nthreads && max_work * 2 * nthreads <= work);
  // at::parallel_for hands each thread one contiguous range of tasks, so one task per thread balances
  // as well as more would
  const int64_t ntasks = serial ? 1 : std::min<int64_t>(B, nthreads);
  if (compact) {
    if (whole)
      return by_structure<int32_t, int8_t>(st, W.data(), O.data(), swork, sexp, ntasks, cutoff, kcap, opts);
    return by_atom<int32_t, int8_t>(st, sid, W.data(), O.data(), cutoff, kcap, nthreads * 8, opts);
  }
  if (whole)
    return by_structure<int64_t, int64_t>(st, W.data(), O.data(), swork, sexp, ntasks, cutoff, kcap, opts);
  return by_atom<int64_t, int64_t>(st, sid, W.data(), O.data(), cutoff, kcap, nthreads * 8, opts);
}

}  // namespace

TORCH_LIBRARY_IMPL(uae_dist, CPU, m) { m.impl("neighbor_list", &neighbor_list_cpu); }

}  // namespace uae_dist
