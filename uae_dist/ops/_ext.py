"""Loads the compiled ``uae_dist._C`` extension and registers its fake kernels and autograd formulas.

``HAS_EXT`` is True when the compiled ops are in use. ``UAE_DISABLE_EXT=1`` forces the pure
PyTorch/NumPy fallback (tests run both paths). Without the extension a warning is logged once.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

HAS_EXT = False
HAS_CUDA_EXT = False
DISABLED = os.environ.get("UAE_DISABLE_EXT", "0") == "1"
LOAD_ERROR: Exception | None = None

if not DISABLED:
    try:
        from uae_dist import _C  # noqa: F401  (registers torch.ops.uae_dist.*)

        HAS_EXT = True
    except Exception as exc:  # pragma: no cover - depends on the build
        LOAD_ERROR = exc

_warned = False


def warn_fallback() -> None:
    """Log once that the pure fallback is in use (called lazily by the ops)."""
    global _warned
    if _warned:
        return
    _warned = True
    if DISABLED:
        log.info("uae_dist ops: UAE_DISABLE_EXT=1, using the pure PyTorch/NumPy fallback")
    else:
        log.warning("uae_dist ops: compiled extension uae_dist._C not available (%s); using the slower "
                    "pure PyTorch/NumPy fallback. Build it with `pip install --no-build-isolation -e .`",
                    LOAD_ERROR)


def backend() -> str:
    """'ext' (+'+cuda' when CUDA kernels are compiled in) or 'fallback'."""
    if not HAS_EXT:
        return "fallback"
    return "ext+cuda" if HAS_CUDA_EXT else "ext"


if HAS_EXT:
    ops = torch.ops.uae_dist
    HAS_CUDA_EXT = torch._C._dispatch_has_kernel_for_dispatch_key("uae_dist::scatter", "CUDA")

    # ---------------------------------------------------------------- fake (meta) kernels
    @torch.library.register_fake("uae_dist::neighbor_list")
    def _neighbor_list_fake(pos, cell, pbc, batch, cutoff, max_neighbors=None, method=0):
        ctx = torch.library.get_ctx()
        e = ctx.new_dynamic_size()
        i = pos.new_empty((e,), dtype=torch.int64)
        return i, pos.new_empty((e,), dtype=torch.int64), pos.new_empty((e, 3), dtype=torch.int64)

    @torch.library.register_fake("uae_dist::scatter")
    def _scatter_fake(src, index, dim_size, reduce, sorted=False):
        torch._check(index.dim() == 1 and index.shape[0] == src.shape[0])
        return src.new_empty((dim_size,) + tuple(src.shape[1:]))

    @torch.library.register_fake("uae_dist::segment_softmax")
    def _softmax_fake(src, index, dim_size, sorted=False):
        torch._check(index.dim() == 1 and index.shape[0] == src.shape[0])
        return torch.empty_like(src, memory_format=torch.contiguous_format)

    # ---------------------------------------------------------------- autograd
    # Backward formulas are written with differentiable ops (index_select and the scatter op itself),
    # so double backward (forces in the loss) works too.
    def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.view((-1,) + (1,) * (like.dim() - 1))

    def _scatter_setup(ctx, inputs, output):
        src, index, dim_size, reduce, sorted_ = inputs
        ctx.reduce, ctx.sorted, ctx.dim_size = reduce, sorted_, dim_size
        if reduce in ("max", "min"):
            ctx.save_for_backward(index, src, output)
        else:
            ctx.save_for_backward(index)

    def _scatter_backward(ctx, grad):
        index = ctx.saved_tensors[0]
        if ctx.reduce == "sum":
            g = grad.index_select(0, index)
        elif ctx.reduce == "mean":
            cnt = torch.bincount(index, minlength=ctx.dim_size).clamp_min(1).to(grad.dtype)
            g = (grad / _bcast(cnt, grad)).index_select(0, index)
        else:
            # Like torch.scatter_reduce(amax/amin): the gradient is shared evenly between tied maxima.
            _, src, out = ctx.saved_tensors
            hit = (src == out.index_select(0, index)).to(grad.dtype)
            n = ops.scatter(hit, index, ctx.dim_size, "sum", ctx.sorted)
            g = grad.index_select(0, index) * hit / n.index_select(0, index).clamp_min(1)
        return g, None, None, None, None

    torch.library.register_autograd("uae_dist::scatter", _scatter_backward, setup_context=_scatter_setup)

    def _softmax_setup(ctx, inputs, output):
        _, index, dim_size, sorted_ = inputs
        ctx.dim_size, ctx.sorted = dim_size, sorted_
        ctx.save_for_backward(index, output)

    def _softmax_backward(ctx, grad):
        index, y = ctx.saved_tensors
        gy = grad * y
        s = ops.scatter(gy, index, ctx.dim_size, "sum", ctx.sorted)
        return gy - y * s.index_select(0, index), None, None, None

    torch.library.register_autograd("uae_dist::segment_softmax", _softmax_backward,
                                    setup_context=_softmax_setup)
