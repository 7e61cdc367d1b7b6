// CPU periodic neighbour list: per structure either a pruned brute force over images (small cells,
// long cutoffs: the usual case for crystals) or a cell list (binning, linear in atoms) for large cells.
// Parallel (at::parallel_for -> OpenMP, honours torch.get_num_threads()) across structures and atoms.
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
};

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

// Image lists of atom pairs (brute-force path): s' as int32 triples (+ d2 with max_neighbors).
struct PairBuf {
  int32_t* s = nullptr;
  double* d2 = nullptr;
  int64_t n = 0, cap = 0;
  bool need_d = false;
  PairBuf() = default;
  PairBuf(const PairBuf&) = delete;
  PairBuf& operator=(const PairBuf&) = delete;
  ~PairBuf() { std::free(s); std::free(d2); }
  void reserve(int64_t c) {
    if (c <= cap) return;
    s = static_cast<int32_t*>(std::realloc(s, 3 * sizeof(int32_t) * c));
    d2 = static_cast<double*>(std::realloc(d2, sizeof(double) * c));  // always: need_d may change
    TORCH_CHECK(s && d2, "neighbor_list: out of memory (", c, " pairs)");
    cap = c;
  }
  inline void push(int64_t a, int64_t b, int64_t c, double dd) {
    if (n == cap) reserve(std::max<int64_t>(1024, 2 * cap));
    s[3 * n] = static_cast<int32_t>(a);
    s[3 * n + 1] = static_cast<int32_t>(b);
    s[3 * n + 2] = static_cast<int32_t>(c);
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
  void* take(int k) {
    if (k < kMaxClass) {
      std::lock_guard<std::mutex> g(mu_);
      auto& v = free_[k];
      if (!v.empty()) {
        void* p = v.back();
        v.pop_back();
        cached_ -= size_t(1) << k;
        return p;
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
  static constexpr size_t kMaxCached = size_t(96) << 20;  // ... and at most 96 MiB kept in all
  std::mutex mu_;
  std::vector<void*> free_[kMaxClass];
  size_t cached_ = 0;
};

at::Tensor pooled_tensor(void* p, int k, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::from_blob(p, sizes, [k](void* q) { BlockCache::get().give(q, k); }, opts);
}

// Output growing by whole atoms; handed to the tensors without a copy. In `pooled` mode (serial calls)
// the first allocation (exact size, or the `hint` estimate) comes from BlockCache; outgrowing it
// moves the data to malloc/realloc'd arrays.
struct OutBuf {
  int64_t* i = nullptr;
  int64_t* j = nullptr;
  int64_t* s = nullptr;
  int64_t n = 0, cap = 0, hint = 0;
  bool pooled = false;
  int ki = 0, ks = 0;
  OutBuf() = default;
  OutBuf(const OutBuf&) = delete;
  OutBuf& operator=(const OutBuf&) = delete;
  ~OutBuf() { release(); }
  void release() {
    if (pooled) {
      if (i) BlockCache::get().give(i, ki);
      if (j) BlockCache::get().give(j, ki);
      if (s) BlockCache::get().give(s, ks);
    } else {
      std::free(i);
      std::free(j);
      std::free(s);
    }
    i = j = s = nullptr;
  }
  void ensure(int64_t extra) {
    if (n + extra <= cap) return;
    if (pooled && cap == 0) {
      const int64_t c = std::max<int64_t>({n + extra, hint, 1});
      ki = BlockCache::size_class(sizeof(int64_t) * c);
      ks = BlockCache::size_class(3 * sizeof(int64_t) * c);
      i = static_cast<int64_t*>(BlockCache::get().take(ki));
      j = static_cast<int64_t*>(BlockCache::get().take(ki));
      s = static_cast<int64_t*>(BlockCache::get().take(ks));
      TORCH_CHECK(i && j && s, "neighbor_list: out of memory (", c, " pairs)");
      cap = std::min<int64_t>((int64_t(1) << ki) / 8, (int64_t(1) << ks) / 24);
      return;
    }
    const int64_t c = std::max<int64_t>(n + extra, cap + cap / 2 + 256);
    if (pooled) {  // outgrew the pooled blocks: continue in malloc'd memory
      int64_t* ni = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * c));
      int64_t* nj = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * c));
      int64_t* ns = static_cast<int64_t*>(std::malloc(3 * sizeof(int64_t) * c));
      TORCH_CHECK(ni && nj && ns, "neighbor_list: out of memory (", c, " pairs)");
      std::memcpy(ni, i, sizeof(int64_t) * n);
      std::memcpy(nj, j, sizeof(int64_t) * n);
      std::memcpy(ns, s, 3 * sizeof(int64_t) * n);
      release();
      pooled = false;
      i = ni;
      j = nj;
      s = ns;
      cap = c;
      return;
    }
    i = static_cast<int64_t*>(std::realloc(i, sizeof(int64_t) * c));
    j = static_cast<int64_t*>(std::realloc(j, sizeof(int64_t) * c));
    s = static_cast<int64_t*>(std::realloc(s, 3 * sizeof(int64_t) * c));
    TORCH_CHECK(i && j && s, "neighbor_list: out of memory (", c, " pairs)");
    cap = c;
  }
};

struct Scratch {
  PairBuf pb;
  HitBuf hb;
  std::vector<int64_t> poff;
  std::vector<int32_t> pcnt;
  std::vector<int64_t> cnt;
  std::vector<double> limit, dd;
};

// Brute force for one structure, using the pair symmetry: only j >= i is searched and (j, i) is the
// mirror image (-s', the very same float64 distance: IEEE rounding is symmetric under negation).
void brute_structure(const Structure& T, const double* W, const int64_t* O, double cutoff, int64_t kcap,
                     Scratch& X, OutBuf& out) {
  const int64_t n = T.p1 - T.p0;
  const StructInfo& S = T.S;
  const bool need_d = kcap >= 0;
  PairBuf& P = X.pb;
  P.need_d = need_d;
  P.n = 0;
  X.poff.resize(n * (n + 1) / 2);
  X.pcnt.resize(n * (n + 1) / 2);
  int64_t* poff = X.poff.data();
  int32_t* pcnt = X.pcnt.data();
  auto tri = [n](int64_t a, int64_t b) { return a * n - a * (a - 1) / 2 + (b - a); };
  for (int64_t li = 0, t = 0; li < n; ++li) {
    const double* wi = W + 3 * (T.p0 + li);
    for (int64_t lj = li; lj < n; ++lj, ++t) {
      const int64_t h0 = P.n;
      pair_images(S, wi, W + 3 * (T.p0 + lj), li == lj, cutoff,
                  [&](int64_t s0, int64_t s1, int64_t s2, double d2) { P.push(s0, s1, s2, d2); });
      poff[t] = h0;
      pcnt[t] = static_cast<int32_t>(P.n - h0);
    }
  }
  X.cnt.assign(n, 0);
  X.limit.assign(need_d ? n : 0, INFINITY);
  for (int64_t la = 0; la < n; ++la) {
    int64_t c = 0;
    for (int64_t lb = 0; lb < la; ++lb) c += pcnt[tri(lb, la)];
    for (int64_t lj = la, t = tri(la, la); lj < n; ++lj, ++t) c += pcnt[t];
    if (need_d && c > kcap) {
      X.dd.clear();
      for (int64_t lb = 0; lb < la; ++lb) {
        const int64_t t = tri(lb, la);
        for (int64_t q = 0; q < pcnt[t]; ++q) X.dd.push_back(std::sqrt(P.d2[poff[t] + q]));
      }
      for (int64_t lj = la, t = tri(la, la); lj < n; ++lj, ++t)
        for (int64_t q = 0; q < pcnt[t]; ++q) X.dd.push_back(std::sqrt(P.d2[poff[t] + q]));
      std::nth_element(X.dd.begin(), X.dd.begin() + (kcap - 1), X.dd.end());
      X.limit[la] = X.dd[kcap - 1] + kTieTol;
      c = 0;
      for (double x : X.dd) c += x <= X.limit[la];
    }
    X.cnt[la] = c;
  }
  int64_t total = 0;
  for (int64_t la = 0; la < n; ++la) total += X.cnt[la];
  out.ensure(total);
  int64_t e = out.n;
  for (int64_t la = 0; la < n; ++la) {
    const int64_t a = T.p0 + la;
    std::fill(out.i + e, out.i + e + X.cnt[la], a);
    const int64_t oa0 = O[3 * a], oa1 = O[3 * a + 1], oa2 = O[3 * a + 2];
    const double lim = need_d ? X.limit[la] : INFINITY;
    const bool check = need_d && std::isfinite(lim);
    for (int64_t lb = 0; lb < la; ++lb) {  // mirrored: (b, a, s') -> (a, b, -s'), reversed order
      const int64_t t = tri(lb, la);
      const int64_t jb = T.p0 + lb;
      const int32_t* sp = P.s + 3 * poff[t];
      const int64_t o0 = oa0 - O[3 * jb], o1 = oa1 - O[3 * jb + 1], o2 = oa2 - O[3 * jb + 2];
      for (int64_t q = pcnt[t] - 1; q >= 0; --q) {
        if (check && !(std::sqrt(P.d2[poff[t] + q]) <= lim)) continue;
        out.j[e] = jb;
        out.s[3 * e] = o0 - sp[3 * q];
        out.s[3 * e + 1] = o1 - sp[3 * q + 1];
        out.s[3 * e + 2] = o2 - sp[3 * q + 2];
        ++e;
      }
    }
    for (int64_t lj = la, t = tri(la, la); lj < n; ++lj, ++t) {
      const int64_t jj = T.p0 + lj;
      const int32_t* sp = P.s + 3 * poff[t];
      const int64_t o0 = oa0 - O[3 * jj], o1 = oa1 - O[3 * jj + 1], o2 = oa2 - O[3 * jj + 2];
      for (int64_t q = 0; q < pcnt[t]; ++q) {
        if (check && !(std::sqrt(P.d2[poff[t] + q]) <= lim)) continue;
        out.j[e] = jj;
        out.s[3 * e] = o0 + sp[3 * q];
        out.s[3 * e + 1] = o1 + sp[3 * q + 1];
        out.s[3 * e + 2] = o2 + sp[3 * q + 2];
        ++e;
      }
    }
  }
  out.n = e;
}

// Whole structures per task (many small structures, or any call too small to be worth threads): the
// working set of a structure stays in cache and the output grows in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor> by_structure(const std::vector<Structure>& st, const double* W,
                                                            const int64_t* O, const std::vector<double>& swork,
                                                            const std::vector<double>& sexp, int64_t ntasks,
                                                            double cutoff, int64_t kcap, at::TensorOptions opts) {
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
  std::vector<OutBuf> out(ntasks);
  if (ntasks == 1) {
    out[0].pooled = true;
    // a single brute-force structure knows its exact size before writing; otherwise start from an estimate
    if (!(B == 1 && !st[0].use_cell)) {
      double e = 0;
      for (double x : sexp) e += x;
      out[0].hint = static_cast<int64_t>(e * 1.3) + 256;
    }
  }
  auto run = [&](int64_t t) {
    // Scratch survives across calls (one per thread): no large malloc per call.
    static thread_local Scratch X;
    if (!out[t].pooled) {
      double e = 0;
      for (int64_t b = lo[t]; b < lo[t + 1]; ++b) e += sexp[b];
      out[t].ensure(static_cast<int64_t>(e * 1.1) + 64);
    }
    for (int64_t b = lo[t]; b < lo[t + 1]; ++b) {
      const Structure& T = st[b];
      if (!T.use_cell) {
        brute_structure(T, W, O, cutoff, kcap, X, out[t]);
        continue;
      }
      X.hb.need_d = kcap >= 0;
      for (int64_t i = T.p0; i < T.p1; ++i) {
        X.hb.n = 0;
        cell_search(T, i, W, O, cutoff, kcap, X.hb);
        const int64_t m = X.hb.n;
        OutBuf& o = out[t];
        o.ensure(m);
        std::fill(o.i + o.n, o.i + o.n + m, i);
        std::memcpy(o.j + o.n, X.hb.j, sizeof(int64_t) * m);
        std::memcpy(o.s + 3 * o.n, X.hb.s, 3 * sizeof(int64_t) * m);
        o.n += m;
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
  auto freer = [](void* p) { std::free(p); };
  if (ntasks == 1) {
    OutBuf& o = out[0];
    const int64_t E = o.n;
    if (E == 0) return {at::empty({0}, opts), at::empty({0}, opts), at::empty({0, 3}, opts)};
    if (o.pooled) {
      at::Tensor ti = pooled_tensor(o.i, o.ki, {E}, opts);
      o.i = nullptr;
      at::Tensor tj = pooled_tensor(o.j, o.ki, {E}, opts);
      o.j = nullptr;
      at::Tensor ts = pooled_tensor(o.s, o.ks, {E, 3}, opts);
      o.s = nullptr;
      return {ti, tj, ts};
    }
    at::Tensor ti = at::from_blob(o.i, {E}, freer, opts);
    o.i = nullptr;
    at::Tensor tj = at::from_blob(o.j, {E}, freer, opts);
    o.j = nullptr;
    at::Tensor ts = at::from_blob(o.s, {E, 3}, freer, opts);
    o.s = nullptr;
    return {ti, tj, ts};
  }
  std::vector<int64_t> off(ntasks + 1, 0);
  for (int64_t t = 0; t < ntasks; ++t) off[t + 1] = off[t] + out[t].n;
  const int64_t E = off[ntasks];
  at::Tensor ti = at::empty({E}, opts), tj = at::empty({E}, opts), ts = at::empty({E, 3}, opts);
  int64_t* pi = ti.data_ptr<int64_t>();
  int64_t* pj = tj.data_ptr<int64_t>();
  int64_t* ps = ts.data_ptr<int64_t>();
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (!out[t].n) continue;
      std::memcpy(pi + off[t], out[t].i, sizeof(int64_t) * out[t].n);
      std::memcpy(pj + off[t], out[t].j, sizeof(int64_t) * out[t].n);
      std::memcpy(ps + 3 * off[t], out[t].s, 3 * sizeof(int64_t) * out[t].n);
    }
  });
  return {ti, tj, ts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> neighbor_list_cpu(
    const at::Tensor& pos_in, const at::Tensor& cell_in, const at::Tensor& pbc_in,
    const std::optional<at::Tensor>& batch_in, double cutoff, std::optional<int64_t> max_neighbors,
    int64_t method) {
  TORCH_CHECK_VALUE(cutoff > 0, "cutoff must be positive, got ", cutoff);
  TORCH_CHECK_VALUE(!max_neighbors.has_value() || *max_neighbors >= 1, "max_neighbors must be >= 1");
  TORCH_CHECK(pos_in.dim() == 2 && pos_in.size(1) == 3, "pos must be (N, 3)");
  const at::Tensor pos = pos_in.to(at::kDouble).contiguous();
  const int64_t N = pos.size(0);
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
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      Structure& T = st[b];
      T.p0 = ptr[b];
      T.p1 = ptr[b + 1];
      prep_struct(Cp + 9 * b, PB + 3 * b, cutoff, T.S);
      if (!T.S.ok) continue;
      for (int64_t a = T.p0; a < T.p1; ++a) wrap_atom(T.S, P + 3 * a, &W[3 * a], &F[3 * a], &O[3 * a]);
      const int64_t n = T.p1 - T.p0;
      if (method == 1 || n == 0) continue;
      plan_grid(T.S, &F[3 * T.p0], n, cutoff, T.grid);
      if (method == 2) {
        T.use_cell = true;
      } else {
        // candidates visited by the cell list relative to the n^2 pairs of the brute force
        double ratio = 1.0;
        for (int k = 0; k < 3; ++k) ratio *= double(2 * T.grid.r[k] + 1) / double(T.grid.n[k]);
        T.use_cell = n >= 64 && ratio <= 0.5;
      }
      if (T.use_cell) build_grid(&F[3 * T.p0], n, T.grid);
    }
  });
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
  const bool serial = nthreads == 1 || work <= 2e5;
  if (serial || (B >= 4 * nthreads && max_work * 2 * nthreads <= work)) {
    return by_structure(st, W.data(), O.data(), swork, sexp, serial ? 1 : std::min<int64_t>(B, 4 * nthreads),
                        cutoff, kcap, pos_in.options().dtype(at::kLong));
  }
  int64_t nchunks = N == 0 ? 0 : 1;
  if (nthreads > 1 && work > 2e5) nchunks = std::min<int64_t>(N, nthreads * 8);
  std::vector<HitBuf> buf(nchunks);   // cell-list structures: final hits per atom
  std::vector<PairBuf> pbuf(nchunks); // brute-force structures: image lists per pair (i <= j)
  std::vector<int64_t> chunk_lo(nchunks + 1);
  for (int64_t c = 0; c <= nchunks; ++c) chunk_lo[c] = nchunks ? N * c / nchunks : 0;
  std::vector<int32_t> chunk_of(N);
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t a = chunk_lo[c]; a < chunk_lo[c + 1]; ++a) chunk_of[a] = static_cast<int32_t>(c);
  // pair tables of the brute-force structures: pair (i, j), i <= j local, at tri(i, j)
  std::vector<int64_t> pair_base(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = st[b].p1 - st[b].p0;
    pair_base[b + 1] = pair_base[b] + (st[b].use_cell ? 0 : n * (n + 1) / 2);
  }
  std::vector<int64_t> pair_off(pair_base[B]);
  std::vector<int32_t> pair_cnt(pair_base[B]);
  auto tri = [&](int64_t b, int64_t li, int64_t lj) {
    const int64_t n = st[b].p1 - st[b].p0;
    return pair_base[b] + li * n - li * (li - 1) / 2 + (lj - li);
  };
  std::vector<int64_t> hit_off(N, 0);  // cell-list atoms: offset of their hits in their chunk's HitBuf
  const bool need_d = kcap >= 0;

  // Phase 1: neighbours. Brute force uses the pair symmetry: only j >= i is searched, (j, i) is the
  // mirror image (-s', the very same float64 distance, since IEEE rounding is symmetric under negation).
  auto run_chunk = [&](int64_t c) {
    HitBuf& Bf = buf[c];
    PairBuf& Pb = pbuf[c];
    const int64_t lo = chunk_lo[c], hi = chunk_lo[c + 1];
    Bf.need_d = need_d;
    Pb.need_d = need_d;
    Bf.count.assign(hi - lo, 0);
    Pb.reserve(static_cast<int64_t>(0.6 * expect * double(hi - lo) / std::max<double>(N, 1)) + 64);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = sid[i];
      const Structure& T = st[b];
      const StructInfo& S = T.S;
      const double* wi = &W[3 * i];
      if (!T.use_cell) {
        const int64_t li = i - T.p0;
        int64_t t = tri(b, li, li);
        for (int64_t j = i; j < T.p1; ++j, ++t) {
          const int64_t h0 = Pb.n;
          pair_images(S, wi, &W[3 * j], i == j, cutoff, [&](int64_t s0, int64_t s1, int64_t s2, double d2) {
            Pb.push(s0, s1, s2, d2);
          });
          pair_off[t] = h0;
          pair_cnt[t] = static_cast<int32_t>(Pb.n - h0);
        }
        continue;
      }
      const int64_t h0 = Bf.n;
      hit_off[i] = h0;
      cell_search(T, i, W.data(), O.data(), cutoff, kcap, Bf);
      Bf.count[i - lo] = Bf.n - h0;
    }
  };
  auto for_chunks = [&](const std::function<void(int64_t)>& f) {
    if (nchunks == 1) {
      f(0);
    } else {
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) f(c);
      });
    }
  };
  for_chunks(run_chunk);

  // Phase 2: per-atom counts (and the max_neighbors distance limit of brute-force atoms).
  std::vector<int64_t> cnt(N, 0);
  std::vector<double> limit(need_d ? N : 0, INFINITY);
  for_chunks([&](int64_t c) {
    std::vector<double> dd;
    for (int64_t a = chunk_lo[c]; a < chunk_lo[c + 1]; ++a) {
      const int64_t b = sid[a];
      const Structure& T = st[b];
      if (T.use_cell) {
        cnt[a] = buf[c].count[a - chunk_lo[c]];
        continue;
      }
      const int64_t la = a - T.p0;
      int64_t n = 0;
      for (int64_t lb = 0; lb < la; ++lb) n += pair_cnt[tri(b, lb, la)];
      const int64_t t0 = tri(b, la, la);
      for (int64_t lj = la; lj < T.p1 - T.p0; ++lj) n += pair_cnt[t0 + lj - la];
      if (need_d && n > kcap) {
        dd.clear();
        for (int64_t lb = 0; lb < la; ++lb) {
          const int64_t t = tri(b, lb, la);
          const double* d = pbuf[chunk_of[T.p0 + lb]].d2 + pair_off[t];
          for (int64_t q = 0; q < pair_cnt[t]; ++q) dd.push_back(std::sqrt(d[q]));
        }
        const double* d = pbuf[c].d2;
        for (int64_t lj = la; lj < T.p1 - T.p0; ++lj)
          for (int64_t q = 0; q < pair_cnt[t0 + lj - la]; ++q) dd.push_back(std::sqrt(d[pair_off[t0 + lj - la] + q]));
        std::nth_element(dd.begin(), dd.begin() + (kcap - 1), dd.end());
        limit[a] = dd[kcap - 1] + kTieTol;
        n = 0;
        for (double x : dd) n += x <= limit[a];
      }
      cnt[a] = n;
    }
  });
  std::vector<int64_t> aoff(N + 1, 0);
  for (int64_t a = 0; a < N; ++a) aoff[a + 1] = aoff[a] + cnt[a];
  const int64_t E = aoff[N];
  auto opts = pos_in.options().dtype(at::kLong);
  at::Tensor ti = at::empty({E}, opts), tj = at::empty({E}, opts), ts = at::empty({E, 3}, opts);
  int64_t* pi = ti.data_ptr<int64_t>();
  int64_t* pj = tj.data_ptr<int64_t>();
  int64_t* ps = ts.data_ptr<int64_t>();

  // Phase 3: write (i, j, shift) sorted by (i, j, shift).
  for_chunks([&](int64_t c) {
    for (int64_t a = chunk_lo[c]; a < chunk_lo[c + 1]; ++a) {
      int64_t e = aoff[a];
      std::fill(pi + e, pi + aoff[a + 1], a);
      const int64_t b = sid[a];
      const Structure& T = st[b];
      if (T.use_cell) {
        const HitBuf& Bf = buf[c];
        const int64_t h0 = hit_off[a];
        std::memcpy(pj + e, Bf.j + h0, sizeof(int64_t) * cnt[a]);
        std::memcpy(ps + 3 * e, Bf.s + 3 * h0, 3 * sizeof(int64_t) * cnt[a]);
        continue;
      }
      const int64_t la = a - T.p0;
      const int64_t oa0 = O[3 * a], oa1 = O[3 * a + 1], oa2 = O[3 * a + 2];
      const double lim = need_d ? limit[a] : INFINITY;
      const bool check = need_d && std::isfinite(lim);
      for (int64_t lb = 0; lb < la; ++lb) {  // mirrored: (b, a, s') -> (a, b, -s'), reversed order
        const int64_t t = tri(b, lb, la);
        const int64_t jb = T.p0 + lb;
        const PairBuf& P = pbuf[chunk_of[jb]];
        const int32_t* sp = P.s + 3 * pair_off[t];
        const int64_t o0 = oa0 - O[3 * jb], o1 = oa1 - O[3 * jb + 1], o2 = oa2 - O[3 * jb + 2];
        for (int64_t q = pair_cnt[t] - 1; q >= 0; --q) {
          if (check && !(std::sqrt(P.d2[pair_off[t] + q]) <= lim)) continue;
          pj[e] = jb;
          ps[3 * e] = o0 - sp[3 * q];
          ps[3 * e + 1] = o1 - sp[3 * q + 1];
          ps[3 * e + 2] = o2 - sp[3 * q + 2];
          ++e;
        }
      }
      const PairBuf& P = pbuf[c];
      const int64_t t0 = tri(b, la, la);
      for (int64_t lj = la; lj < T.p1 - T.p0; ++lj) {
        const int64_t t = t0 + lj - la;
        const int64_t jj = T.p0 + lj;
        const int32_t* sp = P.s + 3 * pair_off[t];
        const int64_t o0 = oa0 - O[3 * jj], o1 = oa1 - O[3 * jj + 1], o2 = oa2 - O[3 * jj + 2];
        for (int64_t q = 0; q < pair_cnt[t]; ++q) {
          if (check && !(std::sqrt(P.d2[pair_off[t] + q]) <= lim)) continue;
          pj[e] = jj;
          ps[3 * e] = o0 + sp[3 * q];
          ps[3 * e + 1] = o1 + sp[3 * q + 1];
          ps[3 * e + 2] = o2 + sp[3 * q + 2];
          ++e;
        }
      }
    }
  });
  return {ti, tj, ts};
}

}  // namespace

TORCH_LIBRARY_IMPL(uae_dist, CPU, m) { m.impl("neighbor_list", &neighbor_list_cpu); }

}  // namespace uae_dist
