"""Keep freed memory in the process (glibc's malloc) instead of handing it back to the kernel.

A training step frees and re-allocates the same activation buffers every step. With glibc's
defaults, blocks above a dynamic mmap threshold are mmap'd and unmapped each time, and the heap top
is trimmed back to the kernel, so every step the kernel maps and zero-fills those pages again.
On the default CPU pretraining this was a third of the remaining kernel time: two ranks ran 1.23×
faster with these settings, and kernel time fell from 15 % to 10 % of the run (docs/results.md).
The memory stays with the process, as it would with a caching allocator, so the peak does not
grow. Variables that the user set (``MALLOC_*_``) win; other C libraries are left alone.

Blocks above 32 MiB (glibc's largest mmap threshold) are still mmap'd and unmapped on every
free; ALIGNN's line-graph activations are hundreds of MiB each and its steps spent more time in
the kernel than in user code. :func:`cache_large_blocks` installs the extension's caching
allocator for blocks of 1 MiB and more (``csrc/cpu_cache.cpp``: per-size-class free lists,
footprint never above the largest live total). ALIGNN on HOIP, one thread, batches of 64:
4.4 → 8.6 structures/s, kernel time 46 % → 4 %, peak RSS 6.9 → 6.5 GB (docs/results.md).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("uae_dist.train")

# mallopt(3) parameters: name -> (glibc constant, value). 32 MiB is glibc's largest mmap
# threshold on 64-bit systems; mallopt takes an int, hence the 2 GiB - 1 trim threshold.
SETTINGS = {"MALLOC_MMAP_THRESHOLD_": (-3, 32 << 20), "MALLOC_TRIM_THRESHOLD_": (-1, 2**31 - 1),
            "MALLOC_TOP_PAD_": (-2, 256 << 20)}


CACHE_MIN_BYTES = 1 << 20


def _cache_op(name: str):
    """``torch.ops.uae_dist.<name>`` of the caching allocator, or None without the extension."""
    import torch

    from uae_dist.ops import _ext

    return getattr(torch.ops.uae_dist, name) if _ext.HAS_EXT and hasattr(torch.ops.uae_dist, name) \
        else None


def cache_large_blocks(min_bytes: int = CACHE_MIN_BYTES) -> bool:
    """Make the extension's caching allocator the CPU allocator for blocks of ``min_bytes`` or
    more (once per process); False without the compiled extension."""
    enable = _cache_op("cpu_cache_enable")
    return False if enable is None else bool(enable(int(min_bytes)))


def cache_stats() -> dict:
    """The caching allocator's counters (all 0 while it is not installed)."""
    names = ("enabled", "hits", "misses", "released", "live_bytes", "cached_bytes", "peak_bytes")
    stats = _cache_op("cpu_cache_stats")
    return dict.fromkeys(names, 0) if stats is None else dict(zip(names, stats()))


def keep_freed_memory() -> list[str]:
    """Apply :data:`SETTINGS` through ``mallopt`` (glibc on Linux only); returns what was set."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return []
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = []
    for env, (param, value) in SETTINGS.items():
        if env not in os.environ and mallopt(param, value) == 1:
            done.append(f"{env.strip('_').lower()}={value}")
    return done
