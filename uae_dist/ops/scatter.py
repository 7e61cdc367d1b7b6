"""Scatter aggregation over graph edges.

:func:`scatter` / :func:`segment_softmax` use the compiled op (CPU: CSR segment reduction, parallel and
vectorised; CUDA: segment kernels) when available, else the pure-PyTorch versions below
(:func:`scatter_torch`, :func:`segment_softmax_torch`), which are also the test oracle.
"""
from __future__ import annotations

import torch

from . import _ext

REDUCTIONS = ("sum", "mean", "max", "min")


def _check(src: torch.Tensor, index: torch.Tensor) -> None:
    if index.device != src.device:
        raise ValueError(f"index is on {index.device} but src is on {src.device}")
    if index.dim() != 1 or index.shape[0] != src.shape[0]:
        raise ValueError(f"index must be (E,) with E == src.shape[0]; got {tuple(index.shape)} "
                         f"for src {tuple(src.shape)}")


def _use_ext(src: torch.Tensor) -> bool:
    return src.dtype.is_floating_point and _ext.use_ext(src.device)


def _check_sorted_fallback(index: torch.Tensor, sorted: bool | None) -> None:
    # the compiled kernels reject a broken sorted=True promise; the fallback keeps the same contract
    if sorted and index.numel() > 1 and bool((index[1:] < index[:-1]).any()):
        raise ValueError("sorted=True but index is not non-decreasing")


def scatter(src: torch.Tensor, index: torch.Tensor, dim_size: int, reduce: str = "sum",
            sorted: bool | None = None) -> torch.Tensor:
    """Reduce rows of ``src`` (E, ...) into ``dim_size`` rows by ``index`` (E,). Empty rows give 0.

    ``index`` must be on ``src``'s device with values in ``[0, dim_size)``. ``sorted=True`` promises
    a non-decreasing ``index`` (edges grouped by receiver): the CUDA kernel then skips its sort.
    A broken promise is an error, not a wrong result: ``ValueError`` on CPU and in the fallback, a
    device-side assertion on CUDA (checked without a host sync). Device policy: :mod:`._ext`.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    _check(src, index)
    if _use_ext(src):
        if index.dtype != torch.int64:
            index = index.long()
        return torch.ops.uae_dist.scatter(src, index, int(dim_size), reduce, bool(sorted))
    _check_sorted_fallback(index, sorted)
    return scatter_torch(src, index, dim_size, reduce)


def segment_softmax(src: torch.Tensor, index: torch.Tensor, dim_size: int,
                    sorted: bool | None = None) -> torch.Tensor:
    """Softmax of ``src`` (E, ...) over the edges that share the same ``index`` value.

    Same index contract as :func:`scatter`."""
    _check(src, index)
    if _use_ext(src):
        if index.dtype != torch.int64:
            index = index.long()
        return torch.ops.uae_dist.segment_softmax(src, index, int(dim_size), bool(sorted))
    _check_sorted_fallback(index, sorted)
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
