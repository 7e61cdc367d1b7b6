"""Scatter aggregation and segment softmax: compiled op vs torch.scatter_reduce / index_add_ (values and
gradients), gradcheck in float64, torch.library.opcheck, and the pure fallback."""
from __future__ import annotations

import pytest
import torch

from uae_dist.ops import _ext, scatter, scatter_torch, segment_softmax, segment_softmax_torch

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


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("sorted_", [False, True])
def test_cuda_matches_cpu(sorted_):
    src, index, n = graph(n=500, deg=12, feat=(32,), sorted_=sorted_, seed=5)
    for reduce in REDUCES:
        a = src.clone().requires_grad_(True)
        b = src.cuda().requires_grad_(True)
        oa, ob = scatter(a, index, n, reduce, sorted=sorted_), scatter(b, index.cuda(), n, reduce, sorted=sorted_)
        torch.testing.assert_close(oa, ob.cpu())
        g = torch.randn_like(oa)
        oa.backward(g)
        ob.backward(g.cuda())
        torch.testing.assert_close(a.grad, b.grad.cpu())
    torch.testing.assert_close(segment_softmax(src, index, n), segment_softmax(src.cuda(), index.cuda(), n).cpu())
