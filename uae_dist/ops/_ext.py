"""Loads the compiled ``uae_dist._C`` extension and registers its fake kernels and autograd formulas.

``HAS_EXT`` is True when the compiled ops are in use, ``HAS_CUDA_EXT`` when they also have CUDA
kernels. Device policy (:func:`use_ext`), the same for every op:

* extension loaded: CPU (and meta) tensors run the compiled kernels; CUDA tensors run the CUDA
  kernels, and a build without them (CPU-only build) handed CUDA tensors raises ``RuntimeError``
  instead of quietly running slow pure-PyTorch code on the GPU;
* no extension (not built, failed to load, or ``UAE_DISABLE_EXT=1`` to choose the fallback on
  purpose): the pure PyTorch/NumPy fallback on every device, with one logged warning;
* other devices (mps, xpu, ...): the pure fallback, with one logged warning.
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


_warned_devices: set = set()


def use_ext(device: torch.device) -> bool:
    """True: run the compiled kernel on ``device``; False: the pure fallback (see the module policy).

    Raises ``RuntimeError`` for CUDA tensors when the loaded extension has no CUDA kernels.
    """
    if not HAS_EXT:
        warn_fallback()
        return False
    kind = device.type
    if kind in ("cpu", "meta"):
        return True
    if kind == "cuda":
        if HAS_CUDA_EXT:
            return True
        raise RuntimeError(
            "uae_dist ops got CUDA tensors but uae_dist._C was built without CUDA kernels (a CPU-only "
            "build). Rebuild it against a CUDA torch on the GPU machine (`pip install "
            "--no-build-isolation -e .`), or set UAE_DISABLE_EXT=1 to run the pure-PyTorch ops on "
            "purpose.")
    if kind not in _warned_devices:
        _warned_devices.add(kind)
        log.warning("uae_dist ops: no compiled kernels for device %r; using the pure PyTorch fallback",
                    kind)
    return False


def require_cuda_kernels() -> None:
    """Raise unless a CUDA device is visible and the extension has CUDA kernels for every op.

    The GPU tests call it (through the ``cuda_kernels`` fixture) so that they can never compare
    the CPU code with itself."""
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    if not HAS_EXT:
        raise RuntimeError(f"uae_dist._C is not loaded ({'UAE_DISABLE_EXT=1' if DISABLED else LOAD_ERROR})")
    missing = [op for op in OPS if not _has_kernel(op, "CUDA")]
    if missing:
        raise RuntimeError(f"uae_dist._C has no CUDA kernels for {missing} (a CPU-only build)")


OPS = ("neighbor_list", "scatter", "segment_softmax")


def _has_kernel(op: str, key: str) -> bool:
    return HAS_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(f"uae_dist::{op}", key)


def backend() -> str:
    """'ext' (+'+cuda' when CUDA kernels are compiled in) or 'fallback'."""
    if not HAS_EXT:
        return "fallback"
    return "ext+cuda" if HAS_CUDA_EXT else "ext"


if HAS_EXT:
    ops = torch.ops.uae_dist
    HAS_CUDA_EXT = all(_has_kernel(op, "CUDA") for op in OPS)

    # ---------------------------------------------------------------- fake (meta) kernels
    @torch.library.register_fake("uae_dist::neighbor_list")
    def _neighbor_list_fake(pos, cell, pbc, batch, cutoff, max_neighbors=None, method=0, compact=False):
        ctx = torch.library.get_ctx()
        e = ctx.new_dynamic_size()
        it, st = (torch.int32, torch.int8) if compact else (torch.int64, torch.int64)
        return pos.new_empty((e,), dtype=it), pos.new_empty((e,), dtype=it), pos.new_empty((e, 3), dtype=st)

    def _check_index(src, index):
        torch._check(index.dim() == 1 and index.shape[0] == src.shape[0],
                     lambda: "index must be (E,) with E == src.size(0)")
        torch._check(index.device == src.device,
                     lambda: f"index is on {index.device} but src is on {src.device}")

    @torch.library.register_fake("uae_dist::scatter")
    def _scatter_fake(src, index, dim_size, reduce, sorted=False):
        _check_index(src, index)
        return src.new_empty((dim_size,) + tuple(src.shape[1:]))

    @torch.library.register_fake("uae_dist::segment_softmax")
    def _softmax_fake(src, index, dim_size, sorted=False):
        _check_index(src, index)
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
            # counts by the op itself: torch.bincount would synchronise with the host on CUDA
            ones = grad.new_ones(index.shape[0])
            cnt = ops.scatter(ones, index, ctx.dim_size, "sum", ctx.sorted).clamp_min(1)
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
