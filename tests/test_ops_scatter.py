"""Scatter aggregation and segment softmax: compiled op and pure fallback vs torch.scatter_reduce /
index_add_ and vs an independent plain-Python oracle (values and gradients), gradcheck in float64,
torch.library.opcheck, the index contract (sorted=True, devices) and the device policy. CUDA: see
test_ops_gpu.py."""
from __future__ import annotations

import pytest
import torch

import numpy as np
from torch._subclasses.fake_tensor import FakeTensorMode

from uae_dist.ops import _ext, neighbor_list, scatter, scatter_torch, segment_softmax, segment_softmax_torch

HAS_EXT = _ext.HAS_EXT
REDUCES = ["sum", "mean", "max", "min"]


@pytest.fixture(params=["ext", "fallback"])
def backend(request, monkeypatch):
    if request.param == "ext" and not HAS_EXT:
        pytest.skip("extension not built")
    if request.param == "fallback":
        monkeypatch.setattr(_ext, "HAS_EXT", False)
    return request.param


def graph(n=37, deg=6, feat=(5,), dtype=torch.float64, sorted_=False, seed=0, empty=True):
    g = torch.Generator().manual_seed(seed)
    e = n * deg
    index = torch.randint(0, n, (e,), generator=g)
    if empty:  # some empty segments
        index = index[(index % 7) != 3]
    if sorted_:
        index = index.sort().values
    src = torch.randn((len(index),) + tuple(feat), generator=g, dtype=dtype)
    return src, index, n


def reference(src, index, n, reduce):
    """torch.scatter_reduce / index_add_ with empty rows = 0."""
    out = src.new_zeros((n,) + tuple(src.shape[1:]))
    if reduce == "sum":
        return out.index_add(0, index, src)
    idx = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
    return out.scatter_reduce(0, idx, src, {"mean": "mean", "max": "amax", "min": "amin"}[reduce], include_self=False)


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("sorted_", [False, True])
@pytest.mark.parametrize("feat", [(), (5,), (3, 4)])
def test_scatter_values_and_grads(reduce, sorted_, feat, backend):
    src, index, n = graph(feat=feat, sorted_=sorted_)
    a = src.clone().requires_grad_(True)
    b = src.clone().requires_grad_(True)
    out = scatter(a, index, n, reduce, sorted=sorted_ or None)
    ref = reference(b, index, n, reduce)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_ties_share_gradient_like_torch(reduce, backend):
    index = torch.tensor([0, 0, 0, 2, 2, 1])
    src = torch.tensor([[1.0, 5.0], [3.0, 5.0], [3.0, -1.0], [2.0, 2.0], [2.0, 7.0], [4.0, 4.0]], dtype=torch.float64)
    a = src.clone().requires_grad_(True)
    b = src.clone().requires_grad_(True)
    scatter(a, index, 4, reduce).sum().backward()
    reference(b, index, 4, reduce).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype, backend):
    src, index, n = graph(feat=(16,), dtype=dtype)
    for reduce in REDUCES:
        ref = reference(src.double(), index, n, reduce).to(dtype)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(scatter(src, index, n, reduce), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(segment_softmax(src, index, n),
                               segment_softmax_torch(src.double(), index, n).to(dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("sorted_", [False, True])
def test_segment_softmax(sorted_, backend):
    src, index, n = graph(feat=(4,), sorted_=sorted_)
    src = src * 30  # large logits: needs the max shift
    a = src.clone().requires_grad_(True)
    b = src.clone().requires_grad_(True)
    y = segment_softmax(a, index, n, sorted=sorted_ or None)
    ref = segment_softmax_torch(b, index, n)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scatter_torch(y.detach(), index, n, "sum")[index], torch.ones_like(y))
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_edge_cases(backend):
    # no edges at all; dim_size 0; out-of-range index; bad reduce
    src = torch.zeros((0, 3), dtype=torch.float64)
    idx = torch.zeros(0, dtype=torch.int64)
    for reduce in REDUCES:
        assert torch.equal(scatter(src, idx, 4, reduce), torch.zeros(4, 3, dtype=torch.float64))
    assert scatter(src, idx, 0).shape == (0, 3)
    assert segment_softmax(src, idx, 4).shape == (0, 3)
    with pytest.raises(ValueError):
        scatter(torch.ones(2, 1), torch.zeros(2, dtype=torch.int64), 1, "prod")
    with pytest.raises((IndexError, RuntimeError)):
        scatter(torch.ones(2, 1), torch.tensor([0, 5]), 3)
    # int32 index is accepted
    src, index, n = graph()
    torch.testing.assert_close(scatter(src, index.int(), n), reference(src, index, n, "sum"))


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("reduce", REDUCES)
def test_gradcheck(reduce):
    src, index, n = graph(n=9, deg=4, feat=(3,), seed=1)
    x = src.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: scatter(t, index, n, reduce), (x,))
    if reduce in ("sum", "mean"):
        assert torch.autograd.gradgradcheck(lambda t: scatter(t, index, n, reduce), (x,))


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_gradcheck_softmax():
    src, index, n = graph(n=9, deg=4, feat=(3,), seed=2)
    x = src.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: segment_softmax(t, index, n), (x,))
    assert torch.autograd.gradgradcheck(lambda t: segment_softmax(t, index, n), (x,))


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("reduce", REDUCES)
def test_opcheck(reduce):
    src, index, n = graph(n=11, deg=4, feat=(3,), seed=3)
    for s, idx, srt in ((src, index, False), (src, index.sort().values, True)):
        torch.library.opcheck(torch.ops.uae_dist.scatter.default, (s.requires_grad_(True), idx, n, reduce, srt))
    torch.library.opcheck(torch.ops.uae_dist.segment_softmax.default, (src.requires_grad_(True), index, n, False))


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_threads_and_large_inputs():
    src, index, n = graph(n=3000, deg=20, feat=(64,), dtype=torch.float32, seed=4)
    nt = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(scatter(src, index, n, "sum"))
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # deterministic order
        torch.testing.assert_close(outs[0], reference(src, index, n, "sum"), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(nt)


# ----------------------------------------------------------------------------- plain-Python oracle
# Row by row with Python loops over NumPy float64 rows: shares no code with index_add_ /
# scatter_reduce, so the fallback (which is built on them) is checked against something else.
def loop_scatter(src, index, n, reduce):
    x, idx = src.detach().double().numpy(), index.numpy()
    out = np.zeros((n,) + x.shape[1:])
    for r in range(n):
        rows = [x[e] for e in range(len(idx)) if idx[e] == r]
        if not rows:
            continue
        acc = rows[0].copy()
        for v in rows[1:]:
            acc = acc + v if reduce in ("sum", "mean") else (np.maximum(acc, v) if reduce == "max"
                                                             else np.minimum(acc, v))
        out[r] = acc / len(rows) if reduce == "mean" else acc
    return out


def loop_scatter_vjp(src, index, n, reduce, g):
    """d(sum(g * scatter(src)))/d src; ties of max/min share the gradient evenly."""
    x, idx, g = src.detach().double().numpy(), index.numpy(), g.double().numpy()
    out = loop_scatter(src, index, n, reduce)
    grad = np.zeros_like(x)
    for e in range(len(idx)):
        r = idx[e]
        members = [q for q in range(len(idx)) if idx[q] == r]
        if reduce == "sum":
            grad[e] = g[r]
        elif reduce == "mean":
            grad[e] = g[r] / len(members)
        else:
            ties = sum((x[q] == out[r]).astype(float) for q in members)
            grad[e] = g[r] * (x[e] == out[r]) / ties
    return grad


def loop_softmax(src, index):
    x, idx = src.detach().double().numpy(), index.numpy()
    y = np.zeros_like(x)
    for r in set(idx.tolist()):
        members = [e for e in range(len(idx)) if idx[e] == r]
        m = x[members[0]].copy()
        for e in members[1:]:
            m = np.maximum(m, x[e])
        z = sum(np.exp(x[e] - m) for e in members)
        for e in members:
            y[e] = np.exp(x[e] - m) / z
    return y


def loop_softmax_vjp(src, index, g):
    y, idx, g = loop_softmax(src, index), index.numpy(), g.double().numpy()
    grad = np.zeros_like(y)
    for e in range(len(idx)):
        dot = sum(g[q] * y[q] for q in range(len(idx)) if idx[q] == idx[e])
        grad[e] = y[e] * (g[e] - dot)
    return grad


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("sorted_", [False, True])
def test_scatter_vs_loop_oracle(reduce, sorted_, backend):
    src, index, n = graph(n=13, deg=4, feat=(3,), sorted_=sorted_, seed=11)
    first = {}
    for e, r in enumerate(index.tolist()):  # exact ties for max/min: copy a row's first value
        if r in first and r % 2 == 0:
            src[e] = src[first[r]]
        first.setdefault(r, e)
    x = src.clone().requires_grad_(True)
    out = scatter(x, index, n, reduce, sorted=sorted_ or None)
    np.testing.assert_allclose(out.detach().numpy(), loop_scatter(src, index, n, reduce), rtol=1e-13, atol=1e-13)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    np.testing.assert_allclose(x.grad.numpy(), loop_scatter_vjp(src, index, n, reduce, g), rtol=1e-13, atol=1e-13)
    # the pure-torch twin itself, whatever backend the fixture selected
    np.testing.assert_allclose(scatter_torch(src, index, n, reduce).numpy(), loop_scatter(src, index, n, reduce),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("sorted_", [False, True])
def test_softmax_vs_loop_oracle(sorted_, backend):
    src, index, n = graph(n=13, deg=4, feat=(3,), sorted_=sorted_, seed=12)
    src = src * 20
    x = src.clone().requires_grad_(True)
    y = segment_softmax(x, index, n, sorted=sorted_ or None)
    np.testing.assert_allclose(y.detach().numpy(), loop_softmax(src, index), rtol=1e-12, atol=1e-14)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y.backward(g)
    np.testing.assert_allclose(x.grad.numpy(), loop_softmax_vjp(src, index, g), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(segment_softmax_torch(src, index, n).numpy(), loop_softmax(src, index),
                               rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- index contract
def test_sorted_promise_broken_is_an_error(backend):
    src, index, n = graph(seed=6)  # unsorted
    assert bool((index[1:] < index[:-1]).any())
    for reduce in REDUCES:
        with pytest.raises(ValueError, match="sorted=True"):
            scatter(src, index, n, reduce, sorted=True)
    with pytest.raises(ValueError, match="sorted=True"):
        segment_softmax(src, index, n, sorted=True)
    # a sorted index with sorted=True is fine, and sorted=False never checks the order
    sidx = index.sort().values
    torch.testing.assert_close(scatter(src, sidx, n, sorted=True), reference(src, sidx, n, "sum"))
    torch.testing.assert_close(scatter(src, index, n, sorted=False), reference(src, index, n, "sum"))


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_op_rejects_broken_sorted_promise():
    src, index, n = graph(seed=7)
    with pytest.raises(ValueError, match="sorted=True"):
        torch.ops.uae_dist.scatter(src, index, n, "sum", True)
    with pytest.raises(ValueError, match="sorted=True"):
        torch.ops.uae_dist.segment_softmax(src, index, n, True)


def test_index_on_another_device_is_an_error(backend):
    src = torch.randn(6, 3, dtype=torch.float64)
    index = torch.zeros(6, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="device|is on"):
        scatter(src, index, 2)
    with pytest.raises(ValueError, match="device|is on"):
        segment_softmax(src, index, 2)
    with pytest.raises(ValueError, match="index must be"):
        scatter(src, torch.zeros(5, dtype=torch.int64), 2)


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_op_fake_kernel_checks_devices():
    src = torch.randn(6, 3, dtype=torch.float64)
    index = torch.zeros(6, dtype=torch.int64, device="meta")
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.uae_dist.scatter(src, index, 2, "sum", False)
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.uae_dist.segment_softmax(src, index, 2, False)


# ----------------------------------------------------------------------------- device policy
def fake_cuda(*shape, dtype=torch.float64):
    return torch.zeros(shape, dtype=dtype, device="cuda")


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_cpu_only_build_refuses_cuda_tensors(monkeypatch):
    """A build without CUDA kernels must not run pure torch on CUDA tensors behind the user's back
    (a "CUDA equals CPU" test would then compare the CPU code with itself)."""
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        src, index = fake_cuda(8, 4), fake_cuda(8, dtype=torch.int64)
        with pytest.raises(RuntimeError, match="without CUDA kernels"):
            scatter(src, index, 3)
        with pytest.raises(RuntimeError, match="without CUDA kernels"):
            segment_softmax(src, index, 3)
        with pytest.raises(RuntimeError, match="without CUDA kernels"):
            neighbor_list(fake_cuda(4, 3), fake_cuda(3, 3), fake_cuda(3, dtype=torch.bool), 3.0)


def test_no_extension_runs_fallback_on_any_device(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    assert _ext.use_ext(torch.device("cuda")) is False
    assert _ext.use_ext(torch.device("cpu")) is False
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = scatter(fake_cuda(8, 4), fake_cuda(8, dtype=torch.int64), 3)
        assert out.device.type == "cuda" and out.shape == (3, 4)


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_require_cuda_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "_has_kernel", lambda op, key: key != "CUDA")
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        _ext.require_cuda_kernels()
    monkeypatch.setattr(_ext, "_has_kernel", lambda op, key: True)
    _ext.require_cuda_kernels()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _ext.require_cuda_kernels()
