"""``edge_lengths`` (the loader's narrowing): the C++ op gives the NumPy reference's bits, agrees
with torch's ``edge_vectors``, and rejects malformed input with errors naming it."""
import numpy as np
import pytest
import torch

from uae_dist.ops import _ext, edge_vectors, neighbor_list_numpy
from uae_dist.ops.geometry import edge_lengths
from uae_dist.ops.neighbors_ref import edge_lengths_numpy

needs_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")


def cells(seed=0, n=6):
    """A batch of random triclinic cells with their 6 Å edges (i, j global; grouped by cell)."""
    rng = np.random.default_rng(seed)
    pos, cell, i, j, shift, nedges, batch = [], [], [], [], [], [], []
    atoms = 0
    for g in range(n):
        c = np.diag(rng.uniform(3.0, 7.0, 3)) + rng.uniform(-1.0, 1.0, (3, 3))
        m = int(rng.integers(1, 9))
        p = rng.random((m, 3)) @ c
        a, b, s = neighbor_list_numpy(p, c, [True] * 3, 6.0)
        pos.append(p), cell.append(c), i.append(a + atoms), j.append(b + atoms), shift.append(s)
        nedges.append(len(a)), batch.append(np.full(m, g))
        atoms += m
    return (np.concatenate(pos), np.stack(cell), np.concatenate(i), np.concatenate(j),
            np.concatenate(shift), np.array(nedges), np.concatenate(batch))


@needs_ext
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_op_gives_the_reference_bits_and_edge_vectors_lengths(seed):
    pos, cell, i, j, shift, nedges, batch = cells(seed)
    d = edge_lengths(pos, cell, i, j, shift, nedges)
    ref = edge_lengths_numpy(pos, cell, i, j, shift, nedges)
    assert d.dtype == np.float64 and len(d) == len(i) > 1000
    assert np.array_equal(d.view(np.int64), ref.view(np.int64))  # the same bits
    _, dt = edge_vectors(torch.from_numpy(pos), torch.from_numpy(cell),
                         torch.from_numpy(np.stack([i, j])), torch.from_numpy(shift),
                         torch.from_numpy(batch))
    np.testing.assert_allclose(d, dt.numpy(), rtol=0, atol=1e-12)
    assert d.max() <= 6.0 + 1e-9
    # one cell at a time: the same bits as the whole batch (the per-item and batched paths agree)
    e0 = np.concatenate([[0], np.cumsum(nedges)])
    one = edge_lengths(pos, cell[:1], i[:e0[1]], j[:e0[1]], shift[:e0[1]], nedges[:1])
    assert np.array_equal(one, d[:e0[1]])
    # float32 positions are widened as the reference widens them
    d32 = edge_lengths(pos.astype(np.float32), cell, i, j, shift, nedges)
    assert np.array_equal(d32, edge_lengths_numpy(pos.astype(np.float32), cell, i, j, shift,
                                                  nedges))


def test_fallback_without_the_extension_is_the_reference(monkeypatch):
    pos, cell, i, j, shift, nedges, _ = cells(3)
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    assert np.array_equal(edge_lengths(pos, cell, i, j, shift, nedges),
                          edge_lengths_numpy(pos, cell, i, j, shift, nedges))


@needs_ext
def test_op_rejects_malformed_input():
    pos, cell, i, j, shift, nedges, _ = cells(4, n=2)
    op = torch.ops.uae_dist.edge_lengths
    t = torch.from_numpy
    args = [t(pos), t(cell), t(i), t(j), t(shift), t(nedges)]
    bad_j = j.copy()
    bad_j[3] = len(pos)
    with pytest.raises(IndexError, match="edge 3 .* outside the"):
        op(*args[:3], t(bad_j), *args[4:])
    with pytest.raises(ValueError, match="nedges"):
        op(*args[:5], t(nedges + 1))
    with pytest.raises(ValueError, match="must be Double"):
        op(t(pos.astype(np.float32)), *args[1:])
    with pytest.raises(ValueError, match="same E edges"):
        op(*args[:3], t(j[:-1]), *args[4:])
