"""Scatter aggregation over graph edges.

:func:`scatter` / :func:`segment_softmax` use the compiled op (CPU: CSR segment reduction, parallel and
vectorised; CUDA: segment kernels) when available, else the pure-PyTorch versions below
(:func:`scatter_torch`, :func:`segment_softmax_torch`), which are also the test oracle.
"""
from __future__ import annotations

import torch

from . import _ext

REDUCTIONS = ("sum", "mean", "max", "min")


def _ext_ok(t: torch.Tensor) -> bool:
    dev = t.device.type
    return _ext.HAS_EXT and (dev == "cpu" or dev == "meta" or (dev == "cuda" and _ext.HAS_CUDA_EXT))


def scatter(src: torch.Tensor, index: torch.Tensor, dim_size: int, reduce: str = "sum",
            sorted: bool | None = None) -> torch.Tensor:
    """Reduce rows of ``src`` (E, ...) into ``dim_size`` rows by ``index`` (E,). Empty rows give 0.

    ``sorted=True`` promises a non-decreasing ``index`` (edges grouped by receiver): the CUDA kernel then
    skips its sort; on CPU sortedness is detected in the same pass that checks bounds.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if _ext_ok(src) and src.dtype.is_floating_point:
        if index.dtype != torch.int64:
            index = index.long()
        return torch.ops.uae_dist.scatter(src, index, int(dim_size), reduce, bool(sorted))
    if not _ext.HAS_EXT:
        _ext.warn_fallback()
    return scatter_torch(src, index, dim_size, reduce)


def segment_softmax(src: torch.Tensor, index: torch.Tensor, dim_size: int,
                    sorted: bool | None = None) -> torch.Tensor:
    """Softmax of ``src`` (E, ...) over the edges that share the same ``index`` value."""
    if _ext_ok(src) and src.dtype.is_floating_point:
        if index.dtype != torch.int64:
            index = index.long()
        return torch.ops.uae_dist.segment_softmax(src, index, int(dim_size), bool(sorted))
    if not _ext.HAS_EXT:
        _ext.warn_fallback()
    return segment_softmax_torch(src, index, dim_size)


def scatter_torch(src: torch.Tensor, index: torch.Tensor, dim_size: int, reduce: str = "sum") -> torch.Tensor:
    """Pure-PyTorch :func:`scatter` (fallback and oracle)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    shape = (dim_size,) + tuple(src.shape[1:])
    idx = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
    out = src.new_zeros(shape)
    if reduce == "sum":
        return out.index_add_(0, index, src)
    torch_reduce = {"mean": "mean", "max": "amax", "min": "amin"}[reduce]
    return out.scatter_reduce(0, idx, src, reduce=torch_reduce, include_self=False)


def segment_softmax_torch(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Pure-PyTorch :func:`segment_softmax` (fallback and oracle)."""
    mx = scatter_torch(src.detach(), index, dim_size, "max")
    e = (src - mx[index]).exp()
    return e / scatter_torch(e, index, dim_size, "sum")[index].clamp_min(torch.finfo(src.dtype).tiny)
