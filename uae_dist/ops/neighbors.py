"""Periodic neighbour list: the compiled op (CPU cell list / pruned image search, CUDA) with a NumPy
fallback. Output convention and order are those of :func:`neighbors_ref.neighbor_list_numpy`."""
from __future__ import annotations

import numpy as np
import torch

from . import _ext
from .neighbors_ref import compact_arrays, neighbor_list_numpy

_op = torch.ops.uae_dist.neighbor_list.default if _ext.HAS_EXT else None


def neighbor_list(pos: torch.Tensor, cell, pbc, cutoff: float, batch: torch.Tensor | None = None,
                  max_neighbors: int | None = None, compact: bool = False):
    """Periodic neighbour list ``(i, j, shift)`` (shift (E, 3) in whole cell vectors).

    One structure: pos (N, 3), cell (3, 3), pbc (3,). Batched: ``batch`` (N,) sorted graph ids, cell
    (B, 3, 3), pbc (B, 3) (or (3,) for all); indices are then global. Sorted by (i, j, shift);
    ``max_neighbors`` keeps each centre's k nearest plus whole tied shells (``cap_mask``). Output
    dtypes: int64, or with ``compact=True`` int32 ``i``/``j`` and int8 ``shift`` (ValueError if a
    shift does not fit). Runs on ``pos``'s device (device policy: :mod:`._ext`).
    Vectors/distances: :func:`uae_dist.ops.edge_vectors` (differentiable).
    """
    if not isinstance(pos, torch.Tensor):
        pos = torch.as_tensor(pos, dtype=torch.float64)
    dev = pos.device
    if not isinstance(cell, torch.Tensor) or cell.device != dev:
        cell = torch.as_tensor(cell, device=dev)
    if not isinstance(pbc, torch.Tensor) or pbc.device != dev:
        pbc = torch.as_tensor(pbc, dtype=torch.bool, device=dev)
    if batch is not None and batch.device != dev:
        raise ValueError(f"batch is on {batch.device} but pos is on {dev}")
    if _ext.use_ext(dev):
        return _op(pos, cell, pbc, batch, float(cutoff), max_neighbors, 0, bool(compact))
    i, j, s = _neighbor_list_fallback(pos, cell, pbc, cutoff, batch, max_neighbors)
    return compact_arrays(i, j, s) if compact else (i, j, s)


def _neighbor_list_fallback(pos, cell, pbc, cutoff, batch, max_neighbors):
    dev = pos.device
    p = pos.detach().cpu().double().numpy()
    c = cell.detach().cpu().double().numpy()
    b = pbc.detach().cpu().numpy().astype(bool)
    if batch is None:
        i, j, s = neighbor_list_numpy(p, c.reshape(3, 3), b.reshape(3), cutoff, max_neighbors)
    else:
        nb = c.shape[0]
        bt = batch.detach().cpu().numpy()
        if len(bt) and np.any(np.diff(bt) < 0):
            raise ValueError("batch must be sorted")
        ptr = np.r_[0, np.cumsum(np.bincount(bt, minlength=nb))]
        b = np.broadcast_to(b.reshape(-1, 3), (nb, 3))
        parts = [neighbor_list_numpy(p[ptr[g]:ptr[g + 1]], c[g], b[g], cutoff, max_neighbors) for g in range(nb)]
        i = np.concatenate([q[0] + ptr[g] for g, q in enumerate(parts)]) if parts else np.zeros(0, np.int64)
        j = np.concatenate([q[1] + ptr[g] for g, q in enumerate(parts)]) if parts else np.zeros(0, np.int64)
        s = np.concatenate([q[2] for q in parts]) if parts else np.zeros((0, 3), np.int64)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(dev)  # noqa: E731
    return t(i), t(j), t(s).reshape(-1, 3)


def neighbor_list_np(pos, cell, pbc, cutoff: float, max_neighbors: int | None = None,
                     compact: bool = False):
    """NumPy in, NumPy out, one structure: ``(i, j, shift)`` with the least per-call overhead.

    Same arrays as :func:`neighbor_list_numpy` (the fallback when the extension is missing): int64 by
    default; ``compact=True`` returns int32 ``i``/``j`` and int8 ``shift`` (the op writes them
    directly: 11 instead of 40 bytes per pair), and raises ValueError if a shift does not fit.
    """
    if _op is None:
        _ext.warn_fallback()
        out = neighbor_list_numpy(pos, cell, pbc, cutoff, max_neighbors)
        return compact_arrays(*out) if compact else out
    i, j, s = _op(torch.from_numpy(np.ascontiguousarray(pos, dtype=np.float64)),
                  torch.from_numpy(np.array(cell, dtype=np.float64)),
                  torch.from_numpy(np.ascontiguousarray(pbc, dtype=bool)), None, float(cutoff),
                  max_neighbors, 0, bool(compact))
    return i.numpy(), j.numpy(), s.numpy()
