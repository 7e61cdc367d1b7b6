"""CUDA kernels of every op against the CPU kernels (values, gradients), the NumPy oracle, opcheck,
the index contract and the absence of host syncs. All `gpu`-marked: skipped without a CUDA device,
and failed (never passed) when a device is there but the CUDA kernels are not (``cuda_kernels``).

No pymatgen (the GPU machine has none): structures are generated here, plus the MP arrays that
``scripts/gpu_check.sh`` carries when ``UAE_GPU_STRUCTURES`` names its .npz file.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from uae_dist.ops import neighbor_list, neighbor_list_numpy, scatter, segment_softmax

pytestmark = pytest.mark.gpu
REDUCES = ["sum", "mean", "max", "min"]


def synthetic_structures(seed=0):
    """Skewed triclinic cells, long cutoffs, slabs, mixed and no periodicity, atoms outside the cell,
    dense supercells up to ~200 atoms."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(48):
        n = int(rng.integers(1, 40)) if k % 8 else int(rng.integers(80, 200))
        cell = np.diag(rng.uniform(2.5, 7.0, 3)) + rng.normal(0, 1.0, (3, 3))
        if k % 8 == 0:
            cell = cell * (n / 8) ** (1 / 3)
        pbc = np.array([True, True, True]) if k % 5 else rng.random(3) < 0.5
        frac = rng.uniform(-0.5, 1.5, (n, 3)) if k % 7 == 0 else rng.uniform(0, 1, (n, 3))
        out.append((frac @ cell, cell, pbc))
    slab = np.array([[2.9, 0, 0], [1.45, 2.51, 0], [0, 0, 25.0]])
    out.append((rng.uniform(0, 1, (6, 3)) * [1, 1, 0.2] @ slab, slab, np.array([True, True, False])))
    out.append((rng.uniform(0, 6, (9, 3)), np.zeros((3, 3)), np.zeros(3, bool)))
    return out


def mp_structures(limits=(("mp", 192), ("dense", 64))):
    path = os.environ.get("UAE_GPU_STRUCTURES")
    if not path:
        return []
    z = np.load(path)  # written by benchmarks/neighbors.py --save-structures: sets "mp", "dense"
    out = []
    for name, limit in limits:
        if f"{name}_ptr" in z.files:
            ptr = z[f"{name}_ptr"]
            out += [(z[f"{name}_pos"][ptr[b]:ptr[b + 1]], z[f"{name}_cell"][b], z[f"{name}_pbc"][b])
                    for b in range(min(limit, len(ptr) - 1))]
    return out


def batch_of(arrs, device):
    pos = torch.from_numpy(np.concatenate([a[0] for a in arrs])).to(device)
    cell = torch.from_numpy(np.stack([a[1] for a in arrs])).to(device)
    pbc = torch.from_numpy(np.stack([a[2] for a in arrs])).to(device)
    counts = torch.tensor([len(a[0]) for a in arrs])
    batch = torch.repeat_interleave(torch.arange(len(arrs)), counts).to(device)
    return pos, cell, pbc, batch


# ----------------------------------------------------------------------------- neighbour list
@pytest.mark.parametrize("max_neighbors", [None, 12])
@pytest.mark.parametrize("compact", [False, True])
def test_neighbors_cuda_equals_cpu(cuda_kernels, max_neighbors, compact):
    arrs = synthetic_structures() + mp_structures()
    for cutoff in (4.0, 8.0):
        cpu = neighbor_list(*batch_of(arrs, "cpu")[:3], cutoff, batch=batch_of(arrs, "cpu")[3],
                            max_neighbors=max_neighbors, compact=compact)
        pos, cell, pbc, batch = batch_of(arrs, "cuda")
        gpu = neighbor_list(pos, cell, pbc, cutoff, batch=batch, max_neighbors=max_neighbors, compact=compact)
        for a, b in zip(cpu, gpu):
            assert b.device.type == "cuda" and a.dtype == b.dtype
            assert torch.equal(a, b.cpu())


def test_neighbors_cuda_equals_oracle_per_structure(cuda_kernels):
    for pos, cell, pbc in synthetic_structures(seed=1)[:24]:
        for k in (None, 5):
            ref = neighbor_list_numpy(pos, cell, pbc, 6.5, k)
            got = neighbor_list(torch.from_numpy(pos).cuda(), torch.from_numpy(cell).cuda(),
                                torch.from_numpy(pbc).cuda(), 6.5, max_neighbors=k)
            for a, b in zip(ref, got):
                assert np.array_equal(a, b.cpu().numpy())


def test_neighbors_cuda_input_errors(cuda_kernels):
    pos = torch.zeros(4, 3, dtype=torch.float64, device="cuda")
    pos[1, 0] = 1.0
    with pytest.raises(ValueError, match="singular"):  # the device-side flag of prep_struct
        neighbor_list(pos, torch.zeros(3, 3, device="cuda"), torch.ones(3, dtype=torch.bool, device="cuda"), 2.0)
    cell = torch.eye(3, dtype=torch.float64, device="cuda").expand(2, 3, 3) * 3
    with pytest.raises(ValueError, match="sorted"):
        neighbor_list(pos, cell, torch.ones(2, 3, dtype=torch.bool, device="cuda"), 2.0,
                      batch=torch.tensor([1, 1, 0, 0], device="cuda"))
    with pytest.raises(IndexError):
        neighbor_list(pos, cell, torch.ones(2, 3, dtype=torch.bool, device="cuda"), 2.0,
                      batch=torch.tensor([0, 0, 1, 2], device="cuda"))
    far = torch.tensor([[0.0, 0, 0], [60.0, 0, 0]], dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="int8"):
        neighbor_list(far, torch.eye(3, dtype=torch.float64, device="cuda") * 0.4,
                      torch.ones(3, dtype=torch.bool, device="cuda"), 0.5, compact=True)


def test_neighbors_cuda_opcheck(cuda_kernels):
    pos, cell, pbc, batch = batch_of(synthetic_structures()[:6], "cuda")
    op = torch.ops.uae_dist.neighbor_list.default
    torch.library.opcheck(op, (pos, cell, pbc, batch, 5.0, None, 0, False))
    torch.library.opcheck(op, (pos, cell, pbc, batch, 5.0, 4, 0, True))


# ----------------------------------------------------------------------------- scatter
def graph(n=500, deg=12, feat=(32,), sorted_=False, seed=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, n, (n * deg,), generator=g)
    index = index[(index % 7) != 3]  # empty rows
    if sorted_:
        index = index.sort().values
    return torch.randn((len(index),) + feat, generator=g, dtype=dtype), index, n


@pytest.mark.parametrize("sorted_", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_scatter_cuda_equals_cpu(cuda_kernels, sorted_, dtype):
    src, index, n = graph(sorted_=sorted_, dtype=dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for reduce in REDUCES:
        a = src.clone().requires_grad_(True)
        b = src.cuda().requires_grad_(True)
        oa = scatter(a, index, n, reduce, sorted=sorted_)
        ob = scatter(b, index.cuda(), n, reduce, sorted=sorted_)
        torch.testing.assert_close(oa, ob.cpu(), rtol=tol, atol=tol)
        g = torch.randn(oa.shape, dtype=torch.float64).to(dtype)
        oa.backward(g)
        ob.backward(g.cuda())
        torch.testing.assert_close(a.grad, b.grad.cpu(), rtol=tol, atol=tol)
    a = src.clone().requires_grad_(True)
    b = src.cuda().requires_grad_(True)
    ya, yb = segment_softmax(a, index, n, sorted=sorted_), segment_softmax(b, index.cuda(), n, sorted=sorted_)
    torch.testing.assert_close(ya, yb.cpu(), rtol=tol, atol=tol)
    g = torch.randn(ya.shape, dtype=torch.float64).to(dtype)
    ya.backward(g)
    yb.backward(g.cuda())
    torch.testing.assert_close(a.grad, b.grad.cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("reduce", REDUCES)
def test_scatter_cuda_opcheck(cuda_kernels, reduce):
    src, index, n = graph(n=11, deg=4, feat=(3,), seed=3)
    src, index = src.cuda(), index.cuda()
    for s, idx, srt in ((src, index, False), (src, index.sort().values, True)):
        torch.library.opcheck(torch.ops.uae_dist.scatter.default, (s.requires_grad_(True), idx, n, reduce, srt))
    torch.library.opcheck(torch.ops.uae_dist.segment_softmax.default, (src.requires_grad_(True), index, n, False))


def test_scatter_cuda_no_host_sync(cuda_kernels):
    src, index, n = graph()
    src, index = src.cuda().requires_grad_(True), index.cuda()
    sidx = index.sort().values
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduce in REDUCES:
            scatter(src, index, n, reduce)
            scatter(src, sidx, n, reduce, sorted=True)
        segment_softmax(src, index, n).sum().backward()
        scatter(src, sidx, n, "mean", sorted=True).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_scatter_cuda_device_mismatch(cuda_kernels):
    src, index, n = graph(n=20, deg=3)
    with pytest.raises(ValueError, match="is on"):
        scatter(src.cuda(), index, n)
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.uae_dist.scatter(src.cuda(), index, n, "sum", False)


@pytest.mark.parametrize("case", ["unsorted", "out_of_range"])
def test_scatter_cuda_index_contract_is_a_device_assert(cuda_kernels, case):
    """A broken index contract stops the process with a device-side assertion (it poisons the CUDA
    context, hence the subprocess) instead of reading out of bounds or returning garbage."""
    code = f"""
import torch
from uae_dist.ops import scatter
src = torch.randn(6, 4, device="cuda")
index = torch.tensor({[3, 1, 2, 0, 0, 1] if case == "unsorted" else [0, 1, 2, 9, 0, 1]}, device="cuda")
scatter(src, index, 4, "sum", sorted={case == "unsorted"})
torch.cuda.synchronize()
print("NO ERROR")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "NO ERROR" not in out, out
    assert "device-side assert" in out or "uae_dist scatter" in out, out
