"""Edge vectors and distances recomputed in plain torch from ``(i, j, shift)``.

Kept out of the neighbour-list kernels on purpose: autograd then flows to positions and cell
(forces, stress) without any custom backward.
"""
from __future__ import annotations

import torch


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
