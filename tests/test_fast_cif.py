"""The gemmi fast CIF path must give exactly pymatgen's structure, or decline (None)."""
import gzip
import json
import math
import warnings

import numpy as np
import pytest

from uae_dist.data.fast_cif import parse_cif_fast
from uae_dist.data.sources import ParseError, parse_cif

pytest.importorskip("gemmi")


def _load(path, k, seed):
    with gzip.open(path, "rt") as f:
        recs = json.load(f)
    rng = np.random.default_rng(seed)
    idx = sorted(rng.choice(len(recs), size=min(k, len(recs)), replace=False).tolist())
    return [(i, recs[i]["cif"]) for i in idx]


def _same(fast, ref):
    assert fast.numbers.dtype == np.int64 and fast.lattice.dtype == np.float64 and fast.frac.dtype == np.float64
    assert fast.numbers.tolist() == ref.numbers.tolist()          # same elements, same site order
    assert fast.frac.shape == ref.frac.shape
    assert np.abs(fast.frac - ref.frac).max() <= 1e-8
    assert np.abs(fast.lattice - ref.lattice).max() <= 1e-8
    assert fast.pbc.tolist() == ref.pbc.tolist() == [True, True, True]


def _check_agrees(cif):
    fast = parse_cif_fast(cif)
    ref = parse_cif(cif, fast_cif=False)
    assert fast is not None
    _same(fast, ref)
    return fast


@pytest.fixture(scope="module")
def mp_sample(mp_path):
    return _load(mp_path, 300, 0)


@pytest.fixture(scope="module")
def hoip_sample(hoip_path):
    return _load(hoip_path, 100, 1)


def test_mp_sample_agrees(mp_sample):
    for i, cif in mp_sample:
        fast = parse_cif_fast(cif)
        assert fast is not None, f"MP record {i} declined"
        _same(fast, parse_cif(cif, fast_cif=False))


def test_hoip_sample_agrees(hoip_sample):
    # HOIP CIFs list no symmetry operations, only the name 'P 1', and end with '#' comment lines
    for i, cif in hoip_sample:
        fast = parse_cif_fast(cif)
        assert fast is not None, f"HOIP record {i} declined"
        _same(fast, parse_cif(cif, fast_cif=False))


def test_symmetrised_cifs_agree(mp_sample):
    """Non-P1 CIFs (asymmetric unit + operations) written by pymatgen's CifWriter(symprec=...)."""
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifWriter
    accepted = 0
    for i, cif in mp_sample[:40]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = Structure.from_str(cif, fmt="cif")
            sym_cif = str(CifWriter(s, symprec=0.01))
        fast = parse_cif_fast(sym_cif)
        if fast is None:  # declined (e.g. images pymatgen would merge); pymatgen still parses it
            parse_cif(sym_cif)
            continue
        _same(fast, parse_cif(sym_cif, fast_cif=False))  # (the conventional cell: may be larger than s)
        accepted += 1
    assert accepted >= 30


def test_symmetrised_handmade_rocksalt():
    ops = ["x, y, z", "-x, -y, -z", "-y, x, z", "y, -x, -z", "x+1/2, y+1/2, z", "x, y+1/2, z+1/2",
           "x+1/2, y, z+1/2", "-x+1/2, -y+1/2, -z", "-x, -y+1/2, -z+1/2", "-x+1/2, -y, -z+1/2"]
    cif = ("data_NaCl\n_symmetry_space_group_name_H-M   'F m -3 m'\n"
           "_cell_length_a 5.64\n_cell_length_b 5.64\n_cell_length_c 5.64\n"
           "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n"
           "loop_\n _symmetry_equiv_pos_site_id\n _symmetry_equiv_pos_as_xyz\n"
           + "".join(f"  {k + 1}  '{o}'\n" for k, o in enumerate(ops))
           + "loop_\n _atom_site_type_symbol\n _atom_site_label\n _atom_site_fract_x\n _atom_site_fract_y\n"
             " _atom_site_fract_z\n _atom_site_occupancy\n"
             "  Cl  Cl1  0.5  0.5  0.5  1\n  Na  Na1  0.0  0.0  0.0  1\n")
    fast = _check_agrees(cif)
    assert fast.numbers.tolist() == [11] * 4 + [17] * 4


def _p1(rows, cell=(4.0, 5.0, 6.0, 90.0, 90.0, 90.0), *, occupancy=True, type_symbol=True, extra=""):
    a, b, c, al, be, ga = cell
    head = (f"data_test\n_symmetry_space_group_name_H-M   'P 1'\n_cell_length_a {a}\n_cell_length_b {b}\n"
            f"_cell_length_c {c}\n_cell_angle_alpha {al}\n_cell_angle_beta {be}\n_cell_angle_gamma {ga}\n"
            "loop_\n _symmetry_equiv_pos_site_id\n _symmetry_equiv_pos_as_xyz\n  1  'x, y, z'\n" + extra)
    tags = (["_atom_site_type_symbol"] if type_symbol else []) + ["_atom_site_label", "_atom_site_fract_x",
                                                                  "_atom_site_fract_y", "_atom_site_fract_z"]
    tags += ["_atom_site_occupancy"] if occupancy else []
    body = "loop_\n" + "".join(f" {t}\n" for t in tags)
    for k, r in enumerate(rows):
        sym, x, y, z = r[:4]
        occ = r[4] if len(r) > 4 else "1"
        vals = ([sym] if type_symbol else []) + [f"{sym}{k}" if type_symbol else sym, x, y, z]
        vals += [occ] if occupancy else []
        body += "  " + "  ".join(str(v) for v in vals) + "\n"
    return head + body


def test_rounding_to_thirds_and_wrapping():
    cif = _p1([("Fe", "0.33333", "0.66667", "0.0"), ("O", "0.3334", "-0.25", "1.0"),
               ("O", "0.66665", "0.5", "0.99999999999")], cell=(3.0, 3.0, 5.0, 90, 90, 120))
    fast = _check_agrees(cif)
    assert fast.frac[0, 0] == 1 / 3 and fast.frac[0, 1] == 2 / 3   # snapped like pymatgen
    assert fast.frac[1, 0] == 0.3334                                # outside 1e-4 relative: kept
    assert fast.frac[1, 1] == 0.75 and fast.frac[1, 2] == 0.0       # wrapped into [0, 1)


def test_label_only_and_uncertainties():
    cif = _p1([("Co1", "0.1(2)", "0.2", "0.3"), ("C2", "0.5", "0.5(1)", "0.5"), ("O12", "0", "0.5", "0.25")],
              type_symbol=False, occupancy=False)
    fast = _check_agrees(cif)
    assert sorted(fast.numbers.tolist()) == [6, 8, 27]


def test_order_with_nan_electronegativity():
    # He and Ar have no Pauling electronegativity (NaN in pymatgen): its sort is order-dependent
    rows = [("Ar", 0.1, 0.1, 0.1), ("Na", 0.2, 0.1, 0.1), ("He", 0.3, 0.1, 0.1), ("Cl", 0.4, 0.1, 0.1),
            ("Na", 0.5, 0.1, 0.1), ("Ar", 0.6, 0.1, 0.1), ("He", 0.7, 0.1, 0.1), ("O", 0.8, 0.1, 0.1)]
    _check_agrees(_p1(rows))
    _check_agrees(_p1(rows[::-1]))
    _check_agrees(_p1([("Ne", 0.1, 0.2, 0.3)]))


def test_equal_electronegativity_sorted_by_symbol():
    # several pairs of elements share a Pauling electronegativity (e.g. Al/Ti ... ); pymatgen then sorts by symbol
    from pymatgen.core import Element
    by_x = {}
    for el in Element:
        if el.Z <= 94 and not math.isnan(el.X):
            by_x.setdefault(el.X, []).append(el.symbol)
    pair = next(v for v in by_x.values() if len(v) >= 2)
    rows = [(pair[1], 0.1, 0.2, 0.3), (pair[0], 0.4, 0.5, 0.6), (pair[1], 0.7, 0.8, 0.9)]
    _check_agrees(_p1(rows))


# ---------------------------------------------------------------- cases that must be left to pymatgen
def _declined(cif):
    assert parse_cif_fast(cif) is None
    return cif


def test_partial_occupancy_declined_and_rejected():
    cif = _declined(_p1([("Fe", 0.0, 0.0, 0.0, "0.5"), ("O", 0.5, 0.5, 0.5)]))
    with pytest.raises(ParseError, match="disordered structure: partially occupied site"):
        parse_cif(cif)


def test_mixed_site_declined_and_rejected():
    cif = _declined(_p1([("Fe", 0.0, 0.0, 0.0, "0.5"), ("Ni", 0.0, 0.0, 0.0, "0.5"), ("O", 0.5, 0.5, 0.5)]))
    with pytest.raises(ParseError, match="disordered structure"):
        parse_cif(cif)


@pytest.mark.parametrize("second", [(0.0, 0.0, 0.0), (0.00005, 0.99996, 0.0), (1.0, 0.0, -0.00002)])
def test_duplicate_sites_declined(second):
    cif = _declined(_p1([("Fe", 0.0, 0.0, 0.0), ("Fe",) + second, ("O", 0.5, 0.5, 0.5)]))
    with pytest.raises(ParseError):  # pymatgen merges them: occupancy 2 > 1
        parse_cif(cif)


def test_close_but_distinct_sites_accepted():
    _check_agrees(_p1([("Fe", 0.0, 0.0, 0.0), ("Fe", 0.0002, 0.0, 0.0), ("O", 0.5, 0.5, 0.5)]))


def test_symmetry_image_listed_twice_declined():
    ops = "loop_\n _symmetry_equiv_pos_as_xyz\n 'x, y, z'\n '-x, -y, -z'\n"
    cif = _p1([("Fe", 0.1, 0.2, 0.3), ("Fe", 0.9, 0.8, 0.7)]).replace(
        "loop_\n _symmetry_equiv_pos_site_id\n _symmetry_equiv_pos_as_xyz\n  1  'x, y, z'\n", ops)
    _declined(cif)


def test_oxidation_state_labels_declined():
    cif = _p1([("Fe2+", 0.0, 0.0, 0.0), ("O2-", 0.5, 0.5, 0.5)],
              extra="loop_\n _atom_type_symbol\n _atom_type_oxidation_number\n  Fe2+  2.0\n  O2-  -2.0\n")
    _declined(cif)
    assert parse_cif(cif).numbers.tolist() == [26, 8]
    # the same labels without the oxidation-number table
    _declined(_p1([("Fe2+", 0.0, 0.0, 0.0), ("O2-", 0.5, 0.5, 0.5)]))


@pytest.mark.parametrize("sym", ["X", "D", "Wat", "OH", "fe", "Fe1"])
def test_unusual_symbols_declined(sym):
    _declined(_p1([(sym, 0.0, 0.0, 0.0), ("O", 0.5, 0.5, 0.5)]))


def test_other_unusual_cifs_declined():
    base = _p1([("Fe", 0.0, 0.0, 0.0), ("O", 0.5, 0.5, 0.5)])
    assert parse_cif_fast(base) is not None
    _declined(base + "\n" + base.replace("data_test", "data_second"))          # two data blocks
    _declined(base.replace("0.5  0.5  0.5", "0.5  ?  0.5"))                     # unknown coordinate
    _declined(base.replace("0.5  0.5  0.5", "0.5  nan  0.5"))
    _declined(base.replace("_cell_length_c 6.0\n", ""))                         # missing cell parameter
    _declined(base.replace("_cell_angle_gamma 90.0", "_cell_angle_gamma 0.0"))   # flat cell
    _declined(base.replace("data_test", "data_t\u00e9st"))                      # non-ASCII
    _declined(base.replace("_atom_site_fract_x", "_ATOM_SITE_FRACT_X"))         # pymatgen is case-sensitive
    # a single non-identity operation: images on themselves, still pymatgen's answer
    _check_agrees(base.replace("'x, y, z'", "'-x, -y, -z'"))
    # space-group name only, not P1: pymatgen generates the operations itself
    no_ops = base.replace("loop_\n _symmetry_equiv_pos_site_id\n _symmetry_equiv_pos_as_xyz\n  1  'x, y, z'\n", "")
    assert parse_cif_fast(no_ops) is not None
    _declined(no_ops.replace("'P 1'", "'P -1'"))
    _declined(base + "_atom_site_moment_label Fe0\n")                            # magnetic CIF
    assert parse_cif_fast("") is None and parse_cif_fast("not a cif at all") is None
    assert parse_cif_fast(None) is None


def test_garbage_declined_and_parse_error():
    for text in ["data_x\n_cell_length_a 1\nloop_\n_a\n", "\x00\x01garbage", "data_x\nloop_\n", "hello"]:
        assert parse_cif_fast(text) is None
        with pytest.raises(ParseError, match="CIF parse failed"):
            parse_cif(text)


def test_close_pair_search_matches_brute_force():
    """The sorted-x prefilter used for large cells finds exactly the pairs the dense test finds."""
    from uae_dist.data.fast_cif import SITE_TOLERANCE, _has_close_pair, _pbc_match
    rng = np.random.default_rng(5)
    for trial in range(300):
        n = int(rng.integers(2, 120))
        c = rng.random((n, 3))
        c[: n // 3, 0] = rng.choice([0.0, 0.5, 1.0, -0.25])          # many shared x values
        if trial % 2:
            i, j = rng.choice(n, 2, replace=False)
            shift = rng.uniform(-0.9e-4, 0.9e-4, 3) + rng.integers(-1, 2, 3)  # across the cell boundary too
            c[j] = c[i] + shift
        brute = int(np.count_nonzero(_pbc_match(c, c, SITE_TOLERANCE))) > n
        assert _has_close_pair(c, SITE_TOLERANCE, dense_max=0) == brute
        assert _has_close_pair(c, SITE_TOLERANCE) == brute
