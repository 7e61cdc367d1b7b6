"""Reference periodic neighbour list in NumPy: the fallback and the test oracle for the C++/CUDA op.

Convention used everywhere in uae_dist: an edge ``(i, j, shift)`` means that atom ``j`` translated by
``shift @ cell`` (``shift`` in whole cell vectors, ``cell`` rows are lattice vectors) lies within
``cutoff`` of atom ``i``; its vector is ``pos[j] + shift @ cell - pos[i]``. All periodic images are
listed, an atom's bonds to its own images included; only the ``(i, i, 0)`` self pair is excluded.
Output is sorted by ``(i, j, shift)`` so it is deterministic and CSR-friendly (grouped by ``i``).
"""
from __future__ import annotations

import numpy as np

# Distances that differ by less than this (Å) belong to the same shell when capping neighbours.
TIE_TOL = 1e-6
# Brute force over images is chunked so one chunk holds at most this many candidate pairs.
_CHUNK_PAIRS = 1 << 21
_CHUNK_EDGES = 16384  # edge_lengths_numpy: temporaries of ~128 kB, recycled without page faults


def image_range(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> np.ndarray:
    """Largest |shift| needed along each cell vector for positions wrapped into [0, 1).

    A vector's k-th fractional component times the plane spacing 1/|b_k| is its extent along the
    plane normal, never more than its length, hence |f_j - f_i + s_k| <= cutoff * |b_k|.
    """
    recip = np.linalg.inv(cell).T  # rows b_k with a_i . b_k = delta_ik
    n = np.floor(cutoff * np.linalg.norm(recip, axis=1)).astype(np.int64) + 1
    return np.where(pbc, n, 0)


def cap_mask(i: np.ndarray, d: np.ndarray, max_neighbors: int, tol: float = TIE_TOL) -> np.ndarray:
    """Keep, for every centre ``i``, its ``max_neighbors`` nearest neighbours plus every neighbour
    tied (within ``tol``) with the last one kept, so whole shells survive and the result does not
    depend on the order of equal distances."""
    if max_neighbors is None or len(i) == 0:
        return np.ones(len(i), dtype=bool)
    order = np.lexsort((d, i))
    i_s, d_s = i[order], d[order]
    starts = np.flatnonzero(np.r_[True, i_s[1:] != i_s[:-1]])
    counts = np.diff(np.r_[starts, len(i_s)])
    rank = np.arange(len(i_s)) - np.repeat(starts, counts)
    kth = np.where(counts > max_neighbors, starts + max_neighbors - 1, starts + counts - 1)
    limit = np.repeat(d_s[kth], counts) + tol
    keep_sorted = (rank < max_neighbors) | (d_s <= limit)
    keep = np.empty(len(i), dtype=bool)
    keep[order] = keep_sorted
    return keep


def compact_arrays(i, j, s):
    """The compact dtypes of a neighbour list: int32 ``i``/``j``, int8 ``shift`` (11 bytes per pair
    instead of 40). Raises ValueError if a shift is outside [-128, 127]. NumPy or torch arrays."""
    if len(s) and int(abs(s).max()) > 127:
        raise ValueError("compact output: a shift does not fit in int8 (use compact=False)")
    if isinstance(i, np.ndarray):
        return i.astype(np.int32), j.astype(np.int32), s.astype(np.int8)
    import torch
    return i.to(torch.int32), j.to(torch.int32), s.to(torch.int8)


def neighbor_list_numpy(pos, cell, pbc, cutoff: float, max_neighbors: int | None = None,
                        return_distances: bool = False, compact: bool = False):
    """Periodic neighbour list of one structure.

    pos: (N, 3) Cartesian; cell: (3, 3) lattice vectors as rows; pbc: (3,) bools.
    Returns ``i, j`` (E,) int64 and ``shift`` (E, 3) int64 (and distances if asked), sorted by
    ``(i, j, shift)``; ``compact=True``: int32 ``i``/``j`` and int8 ``shift`` (:func:`compact_arrays`).
    """
    pos = np.asarray(pos, dtype=np.float64).reshape(-1, 3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    n = len(pos)
    if cutoff <= 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    if pbc.any():
        if abs(np.linalg.det(cell)) < 1e-12:
            raise ValueError("periodic structure with a singular cell")
        frac = pos @ np.linalg.inv(cell)
        offset = np.where(pbc, np.floor(frac), 0.0)
        wrapped = (frac - offset) @ cell
        nmax = image_range(cell, pbc, cutoff)
    else:
        offset = np.zeros((n, 3))
        wrapped = pos
        nmax = np.zeros(3, dtype=np.int64)
    axes = [np.arange(-k, k + 1) for k in nmax]
    images = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    image_vecs = images @ cell
    per_chunk = max(1, _CHUNK_PAIRS // max(1, n * n))
    cut2 = cutoff * cutoff
    out_i, out_j, out_s, out_d = [], [], [], []
    for c0 in range(0, len(images), per_chunk):
        sv = image_vecs[c0:c0 + per_chunk]
        # (M, N_i, N_j, 3) vectors from i to image of j
        vec = wrapped[None, None, :, :] + sv[:, None, None, :] - wrapped[None, :, None, :]
        d2 = np.einsum("mijk,mijk->mij", vec, vec)
        m, ii, jj = np.nonzero(d2 <= cut2)
        s = images[c0 + m]
        not_self = ~((ii == jj) & ~s.any(axis=1))
        m, ii, jj, s = m[not_self], ii[not_self], jj[not_self], s[not_self]
        out_i.append(ii); out_j.append(jj); out_s.append(s); out_d.append(np.sqrt(d2[m, ii, jj]))
    i = np.concatenate(out_i).astype(np.int64)
    j = np.concatenate(out_j).astype(np.int64)
    s = np.concatenate(out_s).astype(np.int64).reshape(-1, 3)
    d = np.concatenate(out_d)
    # back from wrapped to the positions as given: s_true = s' + o_i - o_j
    s = s + (offset[i] - offset[j]).astype(np.int64)
    if max_neighbors is not None:
        keep = cap_mask(i, d, max_neighbors)
        i, j, s, d = i[keep], j[keep], s[keep], d[keep]
    order = np.lexsort((s[:, 2], s[:, 1], s[:, 0], j, i))
    i, j, s, d = i[order], j[order], s[order], d[order]
    if compact:
        i, j, s = compact_arrays(i, j, s)
    if return_distances:
        return i, j, s, d
    return i, j, s


def edge_lengths_numpy(pos, cell, i, j, shift, nedges) -> np.ndarray:
    """``|pos[j] + shift @ cell - pos[i]|`` per stored edge (float64), ``cell`` (B, 3, 3) and
    ``nedges`` edges per cell, edges grouped by cell: the oracle and fallback of the C++ op
    (``uae_dist.ops.geometry.edge_lengths``), which does the same arithmetic in the same order.

    Spelled out elementwise (no BLAS call, whose threads spin against loader workers; the same bits
    for a batch of one or many) and in chunks (whole-batch temporaries are megabytes that malloc
    maps fresh and page-faults at every batch, which cost more than the arithmetic)."""
    pt = np.ascontiguousarray(np.asarray(pos, np.float64).T)  # (3, N): 1-D gathers per component
    cell9 = np.ascontiguousarray(np.asarray(cell, np.float64).reshape(-1, 9).T)  # row 3k+c: [k, c]
    graph = np.repeat(np.arange(len(nedges), dtype=np.intp), nedges)
    d = np.empty(len(i))
    for a in range(0, len(i), _CHUNK_EDGES):
        b = min(a + _CHUNK_EDGES, len(i))
        ic, jc, g = i[a:b], j[a:b], graph[a:b]
        st = shift[a:b].T.astype(np.float64)  # (3, chunk)
        ce = cell9[:, g]  # (9, chunk)
        d2 = None
        for c in range(3):
            v = pt[c][jc] + (st[0] * ce[c] + st[1] * ce[3 + c] + st[2] * ce[6 + c]) - pt[c][ic]
            d2 = v * v if d2 is None else d2 + v * v
        np.sqrt(d2, out=d[a:b])
    return d
