"""Periodic neighbour list: compiled op vs the NumPy oracle (exact) and vs pymatgen (pair sets).

Runs against the extension and the pure fallback (``backend`` fixture). ``UAE_TEST_MP_N`` sets how
many MP structures are checked against pymatgen (default 1000, as the issue asks).
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from uae_dist import ops
from uae_dist.ops import _ext, edge_vectors, neighbor_list, neighbor_list_np, neighbor_list_numpy
from uae_dist.ops import neighbors as nb_mod
from uae_dist.ops.neighbors_ref import cap_mask

pmg = pytest.importorskip("pymatgen.core")
Lattice, Structure = pmg.Lattice, pmg.Structure

HAS_EXT = _ext.HAS_EXT
MP_N = int(os.environ.get("UAE_TEST_MP_N", "1000"))  # the 1,000 MP structures at 8 Å


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(params=["ext", "fallback"])
def backend(request, monkeypatch):
    if request.param == "ext" and not HAS_EXT:
        pytest.skip("extension not built")
    if request.param == "fallback":
        monkeypatch.setattr(_ext, "HAS_EXT", False)
        monkeypatch.setattr(nb_mod, "_op", None)
    return request.param


def arrays(s):
    return (np.ascontiguousarray(s.cart_coords, dtype=np.float64), np.array(s.lattice.matrix, dtype=np.float64),
            np.array(s.lattice.pbc, dtype=bool))


def ours(pos, cell, pbc, cutoff, max_neighbors=None):
    i, j, s = neighbor_list(torch.as_tensor(pos), torch.as_tensor(cell), torch.as_tensor(pbc), cutoff,
                            max_neighbors=max_neighbors)
    return i.numpy(), j.numpy(), s.numpy()


def as_set(i, j, s):
    return set(zip(i.tolist(), j.tolist(), map(tuple, np.asarray(s).astype(np.int64).tolist())))


def pmg_set(structure, cutoff, max_neighbors=None):
    c, p, img, d = structure.get_neighbor_list(cutoff)
    keep = cap_mask(c.astype(np.int64), d, max_neighbors)
    return as_set(c[keep], p[keep], np.rint(img[keep]))


def assert_same_arrays(a, b):
    for x, y, name in zip(a, b, "ijs"):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == np.int64 and y.dtype == np.int64, name
        assert x.shape == y.shape, (name, x.shape, y.shape)
        assert np.array_equal(x, y), name


def check_structure(s, cutoff, max_neighbors=None):
    pos, cell, pbc = arrays(s)
    got = ours(pos, cell, pbc, cutoff, max_neighbors)
    ref = neighbor_list_numpy(pos, cell, pbc, cutoff, max_neighbors)
    assert_same_arrays(got, ref)
    assert as_set(*got) == pmg_set(s, cutoff, max_neighbors)
    if HAS_EXT:  # both CPU algorithms must agree with the oracle exactly
        for method in (1, 2):
            out = torch.ops.uae_dist.neighbor_list(torch.from_numpy(pos), torch.from_numpy(cell), torch.from_numpy(pbc),
                                                   None, cutoff, max_neighbors, method)
            assert_same_arrays([t.numpy() for t in out], ref)
    return len(got[0])


def skewed_lattice():
    return Lattice.from_parameters(3.1, 4.3, 5.2, 38.0, 71.0, 103.0)


CASES = {
    "bulk_nacl": lambda: Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    "one_atom": lambda: Structure(Lattice([[0, 1.8, 1.8], [1.8, 0, 1.8], [1.8, 1.8, 0]]), ["Cu"], [[0, 0, 0]]),
    "skewed_triclinic": lambda: Structure(skewed_lattice(), ["Si", "O", "O", "Mg"],
                                          [[0.1, 0.2, 0.3], [0.7, 0.1, 0.9], [0.45, 0.55, 0.05], [0.99, 0.98, 0.51]]),
    "long_cutoff": lambda: Structure(Lattice([[2.1, 0.2, 0.0], [0.4, 2.3, 0.1], [0.3, -0.2, 1.9]]), ["Li", "H"],
                                     [[0.0, 0.0, 0.0], [0.4, 0.6, 0.3]]),
    "slab_vacuum": lambda: Structure(Lattice([[2.9, 0, 0], [1.45, 2.51, 0], [0, 0, 25.0]]), ["Pt", "Pt", "Pt"],
                                     [[0, 0, 0.30], [0.333, 0.333, 0.386], [0.667, 0.667, 0.472]]),
    "mixed_pbc": lambda: Structure(Lattice([[3.0, 0, 0], [0.5, 4.0, 0], [0.3, 0.2, 6.0]], pbc=(True, False, True)),
                                   ["C", "N", "O"], [[0.1, 0.2, 0.3], [0.6, 1.4, 0.7], [0.3, -0.8, 0.5]],
                                   coords_are_cartesian=False),
    "slab_nonperiodic_z": lambda: Structure(Lattice([[2.9, 0, 0], [1.45, 2.51, 0], [0, 0, 10.0]], pbc=(True, True, False)),
                                            ["Pt", "Pt", "Pt"], [[0, 0, 0.10], [0.333, 0.333, 0.186], [0.667, 0.667, 0.272]]),
}
CUTOFFS = {"bulk_nacl": 6.1, "one_atom": 8.05, "skewed_triclinic": 6.3, "long_cutoff": 9.3, "slab_vacuum": 5.5,
           "mixed_pbc": 7.7, "slab_nonperiodic_z": 6.6}


# ----------------------------------------------------------------------------- small cases
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("max_neighbors", [None, 5])
def test_cases_vs_pymatgen_and_oracle(name, max_neighbors, backend):
    s = CASES[name]()
    if name == "long_cutoff":
        assert CUTOFFS[name] > max(s.lattice.abc)
    n = check_structure(s, CUTOFFS[name], max_neighbors)
    assert n > 0


def test_positions_outside_cell_and_exact_boundary(backend):
    rng = np.random.default_rng(1)
    cell = np.array([[3.0, 0.2, 0.1], [0.5, 3.5, -0.3], [-0.4, 0.6, 4.0]])
    pos = rng.uniform(-2.0, 2.0, (6, 3)) @ cell  # fractional coordinates in [-2, 2)
    for pbc in ([1, 1, 1], [1, 0, 1], [0, 0, 0], [0, 1, 0]):
        for cut in (2.0, 4.5, 8.0):
            for k in (None, 1, 4):
                ref = neighbor_list_numpy(pos, cell, np.array(pbc, bool), cut, k)
                assert_same_arrays(ours(pos, cell, np.array(pbc, bool), cut, k), ref)
    # simple cubic with the cutoff exactly at the lattice constant: 6 first neighbours are kept (d <= cutoff)
    i, j, s = ours(np.zeros((1, 3)), np.eye(3) * 4.0, np.ones(3, bool), 4.0)
    assert len(i) == 6 and sorted(map(tuple, s.tolist())) == sorted(
        [(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)])


def test_non_periodic_singular_cell_and_empty(backend):
    pos = np.array([[0.0, 0, 0], [1.0, 0, 0], [0, 3.0, 0]])
    got = ours(pos, np.zeros((3, 3)), np.zeros(3, bool), 1.5)
    assert_same_arrays(got, (np.array([0, 1]), np.array([1, 0]), np.zeros((2, 3), np.int64)))
    i, j, s = ours(np.zeros((0, 3)), np.eye(3), np.ones(3, bool), 3.0)
    assert len(i) == 0 and s.shape == (0, 3)
    with pytest.raises(ValueError):
        ours(pos, np.zeros((3, 3)), np.ones(3, bool), 1.5)
    with pytest.raises(ValueError):
        ours(pos, np.eye(3), np.ones(3, bool), 0.0)


def test_batched_global_indices(backend):
    structs = [CASES[k]() for k in ("bulk_nacl", "one_atom", "skewed_triclinic", "slab_vacuum", "mixed_pbc")]
    arrs = [arrays(s) for s in structs]
    pos = torch.from_numpy(np.concatenate([a[0] for a in arrs]))
    cell = torch.from_numpy(np.stack([a[1] for a in arrs]))
    pbc = torch.from_numpy(np.stack([a[2] for a in arrs]))
    counts = torch.tensor([len(a[0]) for a in arrs])
    batch = torch.repeat_interleave(torch.arange(len(arrs)), counts)
    ptr = np.r_[0, np.cumsum(counts.numpy())]
    for k in (None, 3):
        got = neighbor_list(pos, cell, pbc, 5.0, batch=batch, max_neighbors=k)
        parts = [neighbor_list_numpy(*a, 5.0, k) for a in arrs]
        ref = (np.concatenate([p[0] + ptr[g] for g, p in enumerate(parts)]),
               np.concatenate([p[1] + ptr[g] for g, p in enumerate(parts)]),
               np.concatenate([p[2] for p in parts]))
        assert_same_arrays([t.numpy() for t in got], ref)
    # edge vectors are differentiable w.r.t. positions and cell
    i, j, s = neighbor_list(pos, cell, pbc, 5.0, batch=batch)
    p = pos.clone().requires_grad_(True)
    c = cell.clone().requires_grad_(True)
    vec, dist = edge_vectors(p, c, torch.stack([i, j]), s, batch)
    assert float(dist.detach().max()) <= 5.0 + 1e-9
    dist.sum().backward()
    assert p.grad is not None and c.grad is not None


def test_numpy_convenience_and_backend_flag(backend):
    pos, cell, pbc = arrays(CASES["skewed_triclinic"]())
    assert_same_arrays(neighbor_list_np(pos, cell, pbc, 6.0, 3), neighbor_list_numpy(pos, cell, pbc, 6.0, 3))
    assert ops.backend() == ("fallback" if backend == "fallback" else ops.backend())


def test_disable_env_forces_fallback():
    code = ("import numpy as np; from uae_dist import ops; assert ops.backend() == 'fallback', ops.backend(); "
            "i, j, s = ops.neighbor_list(np.zeros((1, 3)), np.eye(3) * 3, [True] * 3, 3.5); assert len(i) == 6")
    env = dict(os.environ, UAE_DISABLE_EXT="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_cell_list_large_structure():
    # 4x4x3 supercell of a distorted rocksalt: the auto method picks the cell list; compare with the oracle
    s = CASES["bulk_nacl"]()
    s.perturb(0.15, min_distance=0.0)
    s.make_supercell([3, 3, 2])
    pos, cell, pbc = arrays(s)
    for k in (None, 12):
        ref = neighbor_list_numpy(pos, cell, pbc, 4.5, k)
        for method in (0, 1, 2):
            out = torch.ops.uae_dist.neighbor_list(torch.from_numpy(pos), torch.from_numpy(cell), torch.from_numpy(pbc),
                                                   None, 4.5, k, method)
            assert_same_arrays([t.numpy() for t in out], ref)


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_opcheck():
    s = CASES["skewed_triclinic"]()
    pos, cell, pbc = (torch.from_numpy(a) for a in arrays(s))
    torch.library.opcheck(torch.ops.uae_dist.neighbor_list.default, (pos, cell, pbc, None, 5.0, None, 0),
                          )
    batch = torch.zeros(len(pos), dtype=torch.int64)
    torch.library.opcheck(torch.ops.uae_dist.neighbor_list.default, (pos, cell[None], pbc[None], batch, 5.0, 4, 0),
                          )


# ----------------------------------------------------------------------------- Materials Project
@pytest.fixture(scope="module")
def mp_structures(mp_path):
    with gzip.open(mp_path, "rt") as fh:
        rows = json.load(fh)
    idx = np.random.default_rng(0).choice(len(rows), size=min(MP_N, len(rows)), replace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_str(rows[k]["cif"], fmt="cif") for k in sorted(idx)]


@pytest.mark.parametrize("max_neighbors", [None, 12])
def test_mp_structures_vs_pymatgen(mp_structures, max_neighbors):
    cutoff = 8.0
    n_pairs = 0
    arrs = [arrays(s) for s in mp_structures]
    for s, a in zip(mp_structures, arrs):
        got = neighbor_list_np(*a, cutoff, max_neighbors)
        assert as_set(*got) == pmg_set(s, cutoff, max_neighbors), s.composition
        assert_same_arrays(got, neighbor_list_numpy(*a, cutoff, max_neighbors))
        n_pairs += len(got[0])
    assert n_pairs > 0
    # one batched call (parallel chunks) gives the same as the per-structure calls
    if HAS_EXT:
        pos = torch.from_numpy(np.concatenate([a[0] for a in arrs]))
        batch = torch.repeat_interleave(torch.arange(len(arrs)), torch.tensor([len(a[0]) for a in arrs]))
        i, j, s = neighbor_list(pos, torch.from_numpy(np.stack([a[1] for a in arrs])),
                                torch.from_numpy(np.stack([a[2] for a in arrs])), cutoff, batch=batch,
                                max_neighbors=max_neighbors)
        assert len(i) == n_pairs


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_parallel_paths_match_serial():
    # one large structure split across threads by atoms, and many structures split by structure
    s = CASES["skewed_triclinic"]()
    s.make_supercell([6, 5, 5])  # 600 atoms: enough work to go parallel
    s.perturb(0.1, min_distance=0.0)
    pos, cell, pbc = (torch.from_numpy(a) for a in arrays(s))
    nt = torch.get_num_threads()
    try:
        for k in (None, 10):
            ref = neighbor_list_numpy(pos.numpy(), cell.numpy(), pbc.numpy(), 6.0, k)
            for method in (0, 1, 2):
                outs = []
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    outs.append(torch.ops.uae_dist.neighbor_list(pos, cell, pbc, None, 6.0, k, method))
                for out in outs:
                    assert_same_arrays([t.numpy() for t in out], ref)
    finally:
        torch.set_num_threads(nt)


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_clustered_atoms_outgrow_size_estimate():
    # atoms packed in a corner of a big cell: far more pairs than the uniform-density estimate
    rng = np.random.default_rng(3)
    arrs = []
    for n in (40, 25, 1):
        cell = np.diag([30.0, 28.0, 31.0])
        pos = rng.uniform(0, 3.0, (n, 3))
        arrs.append((pos, cell, np.ones(3, bool)))
    pos = torch.from_numpy(np.concatenate([a[0] for a in arrs]))
    cell = torch.from_numpy(np.stack([a[1] for a in arrs]))
    pbc = torch.from_numpy(np.stack([a[2] for a in arrs]))
    batch = torch.repeat_interleave(torch.arange(len(arrs)), torch.tensor([len(a[0]) for a in arrs]))
    ptr = np.r_[0, np.cumsum([len(a[0]) for a in arrs])]
    for k in (None, 7):
        parts = [neighbor_list_numpy(*a, 5.0, k) for a in arrs]
        ref = (np.concatenate([p[0] + ptr[g] for g, p in enumerate(parts)]),
               np.concatenate([p[1] + ptr[g] for g, p in enumerate(parts)]),
               np.concatenate([p[2] for p in parts]))
        for _ in range(3):  # recycled output blocks
            got = neighbor_list(pos, cell, pbc, 5.0, batch=batch, max_neighbors=k)
            assert_same_arrays([t.numpy() for t in got], ref)


@pytest.mark.parametrize("max_neighbors", [None, 7])
def test_compact_output(backend, max_neighbors):
    """compact=True: the same list as int32 i/j and int8 shift, from the op, the NumPy wrapper and the
    reference alike; a shift beyond int8 is a ValueError, never a wrapped value."""
    arrs = [arrays(CASES[k]()) for k in CASES]
    for a in arrs:
        ref = neighbor_list_numpy(*a, 7.0, max_neighbors)
        for got in (neighbor_list_np(*a, 7.0, max_neighbors, compact=True),
                    neighbor_list_numpy(*a, 7.0, max_neighbors, compact=True),
                    [t.numpy() for t in neighbor_list(*(torch.from_numpy(x) for x in a), 7.0,
                                                      max_neighbors=max_neighbors, compact=True)]):
            assert [x.dtype for x in got] == [np.int32, np.int32, np.int8]
            for x, y in zip(got, ref):
                assert np.array_equal(x.astype(np.int64), y)
    pos = torch.from_numpy(np.concatenate([a[0] for a in arrs]))
    cell = torch.from_numpy(np.stack([a[1] for a in arrs]))
    pbc = torch.from_numpy(np.stack([a[2] for a in arrs]))
    batch = torch.repeat_interleave(torch.arange(len(arrs)), torch.tensor([len(a[0]) for a in arrs]))
    wide = neighbor_list(pos, cell, pbc, 7.0, batch=batch, max_neighbors=max_neighbors)
    narrow = neighbor_list(pos, cell, pbc, 7.0, batch=batch, max_neighbors=max_neighbors, compact=True)
    assert [t.dtype for t in narrow] == [torch.int32, torch.int32, torch.int8]
    assert all(torch.equal(x, y.long()) for x, y in zip(wide, narrow))
    # an atom 160 cells away: its shifts need more than int8
    far = (np.array([[0.0, 0, 0], [200.0, 0.1, 0]]), np.eye(3) * 1.2, np.ones(3, bool))
    assert int(np.abs(neighbor_list_np(*far, 1.0)[2]).max()) > 127
    for call in (lambda: neighbor_list_np(*far, 1.0, compact=True),
                 lambda: neighbor_list_numpy(*far, 1.0, compact=True)):
        with pytest.raises(ValueError, match="int8"):
            call()


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_compact_parallel_paths_and_opcheck():
    s = CASES["skewed_triclinic"]()
    s.make_supercell([6, 5, 5])
    pos, cell, pbc = (torch.from_numpy(a) for a in arrays(s))
    nt = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for method in (0, 1, 2):
                wide = torch.ops.uae_dist.neighbor_list(pos, cell, pbc, None, 5.0, None, method, False)
                narrow = torch.ops.uae_dist.neighbor_list(pos, cell, pbc, None, 5.0, None, method, True)
                assert all(torch.equal(x, y.long()) for x, y in zip(wide, narrow))
    finally:
        torch.set_num_threads(nt)
    small = [torch.from_numpy(a) for a in arrays(CASES["skewed_triclinic"]())]
    torch.library.opcheck(torch.ops.uae_dist.neighbor_list.default, (*small, None, 5.0, 3, 0, True))


def test_batch_on_another_device_is_an_error():
    pos = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="is on"):
        neighbor_list(pos, torch.eye(3)[None] * 3, torch.ones(1, 3, dtype=torch.bool), 2.0,
                      batch=torch.zeros(2, dtype=torch.int64, device="meta"))


def test_extension_is_built_where_required():
    """CI and `make test` set UAE_REQUIRE_EXT=1: a broken build must fail, not fall back silently."""
    if os.environ.get("UAE_REQUIRE_EXT") != "1":
        pytest.skip("UAE_REQUIRE_EXT not set")
    assert HAS_EXT, f"uae_dist._C failed to load: {_ext.LOAD_ERROR}"
