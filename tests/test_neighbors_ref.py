"""The reference neighbour list (fallback and oracle of the compiled op) against pymatgen."""
import gzip
import json

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from uae_dist.ops.neighbors_ref import TIE_TOL, cap_mask, neighbor_list_numpy


def pymatgen_pairs(s: Structure, r: float):
    c, p, img, d = s.get_neighbor_list(r)
    return set(zip(c.tolist(), p.tolist(), map(tuple, np.rint(img).astype(int).tolist()))), (c, p, img, d)


def our_pairs(s: Structure, r: float, max_neighbors=None):
    i, j, sh = neighbor_list_numpy(s.cart_coords, s.lattice.matrix, s.pbc, r, max_neighbors)
    return set(zip(i.tolist(), j.tolist(), map(tuple, sh.tolist()))), (i, j, sh)


GEOMETRIES = {
    "bulk_rocksalt": (Structure(Lattice.cubic(5.64), ["Na", "Na", "Na", "Na", "Cl", "Cl", "Cl", "Cl"],
                                [[0, 0, 0], [.5, .5, 0], [.5, 0, .5], [0, .5, .5],
                                 [.5, 0, 0], [0, .5, 0], [0, 0, .5], [.5, .5, .5]]), 6.0),
    "one_atom": (Structure(Lattice.cubic(2.87), ["Fe"], [[0, 0, 0]]), 5.0),
    "skewed_triclinic": (Structure(Lattice.from_parameters(3.1, 4.7, 5.3, 62.0, 71.0, 118.0), ["Si", "O", "O"],
                                   [[0.12, 0.05, 0.91], [0.5, 0.43, 0.2], [0.93, 0.77, 0.48]]), 6.0),
    "cutoff_longer_than_cell": (Structure(Lattice.from_parameters(2.1, 2.4, 2.2, 80, 95, 101), ["C", "N"],
                                          [[0, 0, 0], [0.4, 0.6, 0.55]]), 9.0),
    "slab_with_vacuum": (Structure(Lattice([[2.9, 0, 0], [1.45, 2.51, 0], [0, 0, 25.0]]), ["Cu", "Cu", "Cu"],
                                   [[0, 0, 0.40], [1 / 3, 1 / 3, 0.48], [2 / 3, 2 / 3, 0.56]]), 8.0),
    "outside_cell_coords": (Structure(Lattice.from_parameters(3.4, 3.9, 4.4, 85, 99, 107), ["Ti", "O"],
                                      [[1.3, -0.4, 2.1], [-0.7, 0.2, 0.35]]), 7.0),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_pairs_equal_pymatgen(name):
    s, r = GEOMETRIES[name]
    ours, (i, j, sh) = our_pairs(s, r)
    ref, _ = pymatgen_pairs(s, r)
    assert len(ours) == len(i), "duplicate pairs"
    assert ours == ref
    assert not np.any((i == j) & ~sh.any(axis=1)), "self pair (i, i, 0) must be excluded"
    key = np.stack([i, j, sh[:, 0], sh[:, 1], sh[:, 2]], 1)
    assert (np.diff(key[:, 0]) >= 0).all() and len(np.unique(key, axis=0)) == len(key)
    order = np.lexsort(key.T[::-1])
    assert (order == np.arange(len(order))).all(), "not sorted by (i, j, shift)"


def test_own_images_included():
    s, r = GEOMETRIES["one_atom"]
    ours, (i, j, sh) = our_pairs(s, r)
    assert len(i) > 0 and (i == 0).all() and (j == 0).all()
    assert (0, 0, (1, 0, 0)) in ours and (0, 0, (-1, 0, 0)) in ours


def test_mixed_pbc():
    s, _ = GEOMETRIES["slab_with_vacuum"]
    s = Structure(s.lattice, s.species, s.frac_coords)
    lat = Lattice(s.lattice.matrix, pbc=(True, True, False))
    s2 = Structure(lat, s.species, s.frac_coords)
    ours, (_, _, sh) = our_pairs(s2, 8.0)
    ref, _ = pymatgen_pairs(s2, 8.0)
    assert ours == ref and (sh[:, 2] == 0).all()


def test_max_neighbors_keeps_whole_shells():
    # bcc Fe: 8 nearest at the same distance, then 6; a cap of 5 must keep all 8 tied neighbours
    s = Structure(Lattice.cubic(2.87), ["Fe", "Fe"], [[0, 0, 0], [.5, .5, .5]])
    _, (i, j, sh) = our_pairs(s, 6.0, max_neighbors=5)
    assert np.bincount(i).tolist() == [8, 8]
    _, (i, j, sh) = our_pairs(s, 6.0, max_neighbors=9)
    assert np.bincount(i).tolist() == [14, 14]


def test_max_neighbors_matches_capped_pymatgen(mp_path):
    recs = json.load(gzip.open(mp_path))[:40]
    for rec in recs:
        s = Structure.from_str(rec["cif"], fmt="cif")
        _, (c, p, img, d) = pymatgen_pairs(s, 6.0)
        keep = cap_mask(c, d, 12)
        ref = set(zip(c[keep].tolist(), p[keep].tolist(), map(tuple, np.rint(img[keep]).astype(int).tolist())))
        ours, (i, *_rest) = our_pairs(s, 6.0, max_neighbors=12)
        assert ours == ref, rec["material_id"]
        assert (np.bincount(i) >= 12).all() or len(i) == len(c)


def test_cap_mask_ties_independent_of_order():
    i = np.array([0, 0, 0, 0, 1, 1])
    d = np.array([1.0, 2.0, 2.0 + TIE_TOL / 10, 3.0, 5.0, 4.0])
    assert cap_mask(i, d, 2).tolist() == [True, True, True, False, True, True]
    perm = np.array([3, 1, 5, 0, 2, 4])
    assert cap_mask(i[perm], d[perm], 2).tolist() == cap_mask(i, d, 2)[perm].tolist()


def test_mp_sample_equals_pymatgen(mp_path):
    recs = json.load(gzip.open(mp_path))
    rng = np.random.default_rng(7)
    for k in rng.choice(len(recs), 60, replace=False):
        s = Structure.from_str(recs[k]["cif"], fmt="cif")
        ours, _ = our_pairs(s, 8.0)
        ref, _ = pymatgen_pairs(s, 8.0)
        assert ours == ref, recs[k]["material_id"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="cutoff"):
        neighbor_list_numpy(np.zeros((1, 3)), np.eye(3), [True] * 3, 0.0)
    with pytest.raises(ValueError, match="singular"):
        neighbor_list_numpy(np.zeros((1, 3)), np.zeros((3, 3)), [True] * 3, 3.0)
