"""Edge vectors and distances recomputed in plain torch from ``(i, j, shift)``.

Kept out of the neighbour-list kernels on purpose: autograd then flows to positions and cell
(forces, stress) without any custom backward.
"""
from __future__ import annotations

import numpy as np
import torch

from . import _ext
from .neighbors_ref import edge_lengths_numpy


def edge_vectors(pos: torch.Tensor, cell: torch.Tensor, edge_index: torch.Tensor, shift: torch.Tensor,
                 batch: torch.Tensor | None = None):
    """Return ``(vec, dist)`` for edges ``edge_index = [i; j]``: ``vec = pos[j] + shift @ cell - pos[i]``.

    ``cell`` is (3, 3) for one structure or (B, 3, 3) with ``batch`` giving each atom's graph.
    """
    i, j = edge_index[0], edge_index[1]
    sh = shift.to(pos.dtype)
    if cell.dim() == 2:
        offs = sh @ cell
    else:
        if batch is None:
            if cell.shape[0] != 1:
                raise ValueError("batched cell needs `batch`")
            offs = sh @ cell[0]
        else:
            offs = torch.bmm(sh.unsqueeze(1), cell[batch[i]]).squeeze(1)
    vec = pos[j] - pos[i] + offs
    return vec, vec.norm(dim=-1)


def edge_lengths(pos, cell, i, j, shift, nedges) -> np.ndarray:
    """Lengths (float64, NumPy) of stored edges ``(i, j, shift)`` of cells ``cell`` (B, 3, 3) with
    ``nedges`` (B,) edges each, edges grouped by cell; NumPy arrays in, for the loader's narrowing
    to a shorter cutoff. The C++ op where the extension is built (one pass, one thread, ~6x the
    NumPy reference), else :func:`~.neighbors_ref.edge_lengths_numpy`: the same bits either way."""
    if not _ext.HAS_EXT:
        _ext.warn_fallback()
        return edge_lengths_numpy(pos, cell, i, j, shift, nedges)

    def t(x, dt):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=dt))

    return torch.ops.uae_dist.edge_lengths(t(pos, np.float64), t(cell, np.float64), t(i, np.int64),
                                           t(j, np.int64), t(shift, np.int64),
                                           t(nedges, np.int64)).numpy()
