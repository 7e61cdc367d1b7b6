"""train/memory.py: glibc keeps freed memory in the process; what the user set wins."""
import json
import os
import platform
import subprocess
import sys

import pytest

from uae_dist.ops import _ext
from uae_dist.train.memory import SETTINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = "import json; from uae_dist.train.memory import keep_freed_memory as k; print(json.dumps(k()))"


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                       timeout=60, check=True)
    return json.loads(p.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_settings_apply_and_user_variables_win():
    assert len(_run({})) == len(SETTINGS) == 3
    got = _run({"MALLOC_TOP_PAD_": "0"})
    assert len(got) == 2 and not any(s.startswith("malloc_top_pad") for s in got)


REUSE = """
import json, resource, sys, torch
from uae_dist.train import memory
if sys.argv[1] == "1":
    assert memory.cache_large_blocks()
for k in range(4):  # a step's large activation, freed and allocated again
    if k == 1:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.full((64 << 20,), float(k))  # 256 MiB, every page written
    assert float(x[-1]) == k
    del x
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
y = torch.ones(80 << 20)  # another size class: the cached 256 MiB go first (footprint bound)
stats = memory.cache_stats()
small = torch.arange(10.0)  # below 1 MiB: allocated and freed as the default allocator does
# kernels' scratch buffers (raw_allocate/raw_deallocate) and autograd, small and large
w = torch.randn(512, 512, requires_grad=True)
for n in (8, 4096):
    torch.nn.functional.gelu(torch.randn(n, 512) @ w).pow(2).mean().backward()
print(json.dumps({"faults": faults, "stats": stats, "y": float(y.sum()),
                  "small": float(small.sum())}))
"""


def _reuse(on: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", REUSE, on], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.splitlines()[-1])


@pytest.mark.skipif(not _ext.HAS_EXT, reason="compiled extension not built (UAE_REQUIRE_EXT "
                    "runs make it fail in test_ops_neighbors)")
def test_large_blocks_are_reused_without_page_faults():
    """csrc/cpu_cache.cpp: a block above glibc's mmap threshold, freed and allocated again, is
    handed out again instead of being unmapped and faulted in again (65,536 faults per 256 MiB
    in 4 KiB pages with glibc alone), and the footprint stays at the largest live total."""
    off, on = _reuse("0"), _reuse("1")
    assert off["faults"] > 3 * 30_000, off  # glibc: mapped, zero-filled and faulted every time
    assert on["faults"] < off["faults"] / 20, (on, off)
    s = on["stats"]
    assert s["enabled"] == 1 and s["hits"] >= 3 and s["released"] >= 1, s
    assert s["live_bytes"] == 320 << 20 and s["cached_bytes"] == 0, s  # y's class: 320 MiB
    assert s["peak_bytes"] == 320 << 20, s  # not 256 + 320: the cached block was released first
    assert on["y"] == off["y"] == float(80 << 20) and on["small"] == 45.0
