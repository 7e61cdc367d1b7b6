"""Scatter aggregation over graph edges (pure-PyTorch implementation; the compiled op plugs in here)."""
from __future__ import annotations

import torch

REDUCTIONS = ("sum", "mean", "max", "min")


def scatter(src: torch.Tensor, index: torch.Tensor, dim_size: int, reduce: str = "sum") -> torch.Tensor:
    """Reduce rows of ``src`` (E, ...) into ``dim_size`` rows by ``index`` (E,). Empty rows give 0."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    shape = (dim_size,) + tuple(src.shape[1:])
    idx = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
    out = src.new_zeros(shape)
    if reduce == "sum":
        return out.index_add_(0, index, src)
    torch_reduce = {"mean": "mean", "max": "amax", "min": "amin"}[reduce]
    return out.scatter_reduce(0, idx, src, reduce=torch_reduce, include_self=False)


def segment_softmax(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Softmax of ``src`` (E, ...) over the edges that share the same ``index`` value."""
    mx = scatter(src.detach(), index, dim_size, "max")
    e = (src - mx[index]).exp()
    return e / scatter(e, index, dim_size, "sum")[index].clamp_min(torch.finfo(src.dtype).tiny)
