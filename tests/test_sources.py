"""Structure sources: ids, targets, parse errors, hashes, formats (real files, real pymatgen parsing)."""
import gzip
import json
import math

import numpy as np
import pytest

from uae_dist.data.sources import Crystal, ParseError, SourceRecord, open_source

MP_SHA = "ae0a87e9ea075fb03fa0954af150c2cbb9ae7278412eadd040728672f7d2ef7c"
HOIP_SHA = "4e9cc75fc4678e0b3e02d005c58944f84a02e9bc109e7d8285d017175c90f880"


def p1_cif(rows, a=4.0, b=4.5, c=5.0, name="t"):
    s = (f"data_{name}\n_symmetry_space_group_name_H-M   'P 1'\n_cell_length_a {a}\n_cell_length_b {b}\n"
         f"_cell_length_c {c}\n_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n"
         "loop_\n _symmetry_equiv_pos_site_id\n _symmetry_equiv_pos_as_xyz\n  1  'x, y, z'\n"
         "loop_\n _atom_site_type_symbol\n _atom_site_label\n _atom_site_fract_x\n _atom_site_fract_y\n"
         " _atom_site_fract_z\n _atom_site_occupancy\n")
    for k, (sym, x, y, z, *occ) in enumerate(rows):
        s += f"  {sym}  {sym}{k}  {x}  {y}  {z}  {occ[0] if occ else 1}\n"
    return s


GOOD = p1_cif([("Na", 0, 0, 0), ("Cl", 0.5, 0.5, 0.5)])
DISORDERED = p1_cif([("Fe", 0, 0, 0, 0.5), ("O", 0.5, 0.5, 0.5)])
GARBAGE = "data_broken\n_cell_length_a 3\nloop_\n_atom_site_label\n"


@pytest.fixture(scope="module")
def mp(mp_path):
    return open_source(mp_path)


# ------------------------------------------------------------------ JSON: real data sets
def test_mp_ids_targets_and_nan(mp):
    assert mp.fmt == "json" and len(mp) == 36737
    assert mp.target_names() == ["e_form_per_atom", "band_gap", "efermi", "volume", "magmom"]
    r = mp.record(0)
    assert isinstance(r, SourceRecord) and r.index == 0 and r.id == "mp-1"
    assert isinstance(r.payload, str) and "data_" in r.payload
    assert all(isinstance(v, float) for v in r.targets.values())
    missing = [k for k in range(len(mp)) if math.isnan(mp.record(k).targets["efermi"])]
    assert [mp.record(k).id for k in missing] == ["mp-10810", "mp-23731"]
    assert not any(math.isnan(v) for k in missing for n, v in mp.record(k).targets.items() if n != "efermi")
    d = mp.describe()
    assert d["fmt"] == "json" and d["id_key"] == "material_id" and d["cif_key"] == "cif" and d["fast_cif"] is True
    assert d["targets"] == mp.target_names()
    with pytest.raises(IndexError):
        mp.record(len(mp))
    with pytest.raises(IndexError):
        mp.record(-1)


def test_mp_parse_fast_equals_pymatgen(mp, mp_path):
    slow = open_source(mp_path, fast_cif=False, targets=["band_gap"])
    for k in (0, 1, 17, 1000, 36736):
        a, b = mp.parse(mp.record(k)), slow.parse(slow.record(k))
        assert isinstance(a, Crystal)
        assert a.numbers.dtype == np.int64 and a.numbers.tolist() == b.numbers.tolist()
        assert np.allclose(a.frac, b.frac, rtol=0, atol=1e-8) and np.allclose(a.lattice, b.lattice, rtol=0, atol=1e-8)
        assert a.pbc.tolist() == [True] * 3 and a.cart.shape == (len(a.numbers), 3)
        assert np.allclose(a.cart, a.frac @ a.lattice)
    # pymatgen orientation: c along z
    c = mp.parse(mp.record(0))
    assert c.lattice[2, 0] == 0.0 and c.lattice[2, 1] == 0.0 and c.lattice[0, 1] == 0.0


def test_mp_target_selection_and_errors(mp_path):
    s = open_source(mp_path, targets="efermi, band_gap")
    assert s.target_names() == ["efermi", "band_gap"]
    assert list(s.record(3).targets) == ["efermi", "band_gap"]
    assert s.describe()["targets"] == ["efermi", "band_gap"]
    with pytest.raises(ValueError, match="band_gapp"):
        open_source(mp_path, targets=["band_gap", "band_gapp"])
    with pytest.raises(ValueError, match="no_such_id"):
        open_source(mp_path, id_key="no_such_id")


def test_sha256_stable(mp, mp_path, hoip_path):
    assert mp.sha256() == MP_SHA == open_source(mp_path, targets=["volume"]).sha256()
    assert open_source(hoip_path).sha256() == HOIP_SHA


def test_hoip_float_ids_and_default_targets(hoip_path):
    s = open_source(hoip_path)
    assert len(s) == 1346 and s.describe()["id_key"] == "hoip_id"
    assert s.record(0).id == "1346"          # stored as the float 1346.0
    ids = [s.record(k).id for k in range(len(s))]
    assert all(i.isdigit() for i in ids) and len(set(ids)) == 1346
    names = s.target_names()
    assert "atomization_energy_per_atom" in names and "gap_hse06" in names
    assert not {"hoip_id", "cif", "file", "label"} & set(names)
    c = s.parse(s.record(0))
    assert sorted(set(c.numbers.tolist())) == [1, 6, 7, 53, 82]
    by_label = open_source(hoip_path, id_key="label", targets=["gap_hse06"])
    assert by_label.record(0).id == "Imidazolium Lead Iodide"


# ------------------------------------------------------------------ JSON: hand-made files
def _write_json(path, recs):
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            json.dump(recs, f)
    else:
        path.write_text(json.dumps(recs))
    return path


@pytest.mark.parametrize("name", ["small.json", "small.json.gz"])
def test_json_small_file(tmp_path, name):
    recs = [
        {"material_id": "a", "e": 1.5, "g": None, "cif": GOOD},
        {"material_id": "b", "e": "n/a", "g": 2, "cif": DISORDERED},
        {"material_id": "c", "e": 3, "cif": GARBAGE},
        {"material_id": "d", "g": 4.0},
        {"material_id": 12.0, "e": 1.0, "g": 1.0, "cif": 17},
        {"material_id": None, "e": 1.0, "g": 1.0, "cif": GOOD},
    ]
    path = _write_json(tmp_path / name, recs)
    # default targets: keys whose values are numbers in most records that have them, counted over
    # the whole source ("e" has one string): the string is that record's problem, not the column's
    assert open_source(path).target_names() == ["e", "g"]
    s = open_source(path, targets=["e", "g"])
    assert s.fmt == "json" and s.target_names() == ["e", "g"]
    ids = [s.record(k).id for k in range(len(s))]
    assert ids == ["a", "b", "c", "d", "12", None]  # null id: no id, and a reject
    assert s.record(5).problem[0] == "missing_id"
    assert s.record(1).problem == ("non_numeric_label", "e: 'n/a' is not a number")
    assert [s.record(k).problem for k in (0, 2, 3, 4)] == [None] * 4
    t = [s.record(k).targets for k in range(4)]
    assert t[0]["e"] == 1.5 and math.isnan(t[0]["g"])
    assert math.isnan(t[1]["e"]) and t[1]["g"] == 2.0
    assert math.isnan(t[3]["e"])
    c = s.parse(s.record(0))
    assert c.numbers.tolist() == [11, 17] and np.allclose(c.lattice, np.diag([4.0, 4.5, 5.0]), atol=1e-12)
    with pytest.raises(ParseError, match="disordered structure: partially occupied site"):
        s.parse(s.record(1))
    for k in (2, 3, 4):
        with pytest.raises(ParseError, match="CIF parse failed"):
            s.parse(s.record(k))
    for fast in (True, False):  # same reasons without the fast path
        s2 = open_source(tmp_path / name, fast_cif=fast)
        with pytest.raises(ParseError, match="disordered"):
            s2.parse(s2.record(1))
        with pytest.raises(ParseError):
            s2.parse(s2.record(2))


def test_json_defaults_and_errors(tmp_path):
    p = _write_json(tmp_path / "x.json", [{"structure": GOOD, "y": 1.0}, {"structure": GOOD, "y": 2.0}])
    s = open_source(p, cif_key="structure")
    assert [s.record(k).id for k in range(2)] == ["0", "1"] and s.target_names() == ["y"]
    assert s.parse(s.record(1)).numbers.tolist() == [11, 17]
    with pytest.raises(ValueError, match="'cif'"):
        open_source(p)  # no 'cif' key
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="list"):
        open_source(bad)
    with pytest.raises(ValueError, match="unknown source format"):
        open_source(p, fmt="poscar")
    with pytest.raises(FileNotFoundError):
        open_source(tmp_path / "nope.json")


# ------------------------------------------------------------------ CGCNN folder
def _cgcnn_folder(root, rows, cifs):
    root.mkdir()
    (root / "id_prop.csv").write_text("".join(",".join(map(str, r)) + "\n" for r in rows))
    for name, text in cifs.items():
        (root / f"{name}.cif").write_text(text)
    return root


def test_cgcnn_folder(tmp_path):
    d = _cgcnn_folder(tmp_path / "cg", [("mp-1", 0.5, 1.0), ("mp-2", "nan", 2.0), ("x3", 1.5, ""), ("x4", 1, 2)],
                      {"mp-1": GOOD, "mp-2": DISORDERED, "x3": GOOD})
    s = open_source(d)
    assert s.fmt == "cgcnn" and len(s) == 4 and s.target_names() == ["target0", "target1"]
    assert [s.record(k).id for k in range(4)] == ["mp-1", "mp-2", "x3", "x4"]
    assert s.record(0).targets == {"target0": 0.5, "target1": 1.0}
    assert math.isnan(s.record(1).targets["target0"]) and math.isnan(s.record(2).targets["target1"])
    assert s.parse(s.record(0)).numbers.tolist() == [11, 17]
    with pytest.raises(ParseError, match="disordered"):
        s.parse(s.record(1))
    with pytest.raises(ParseError, match="not found"):
        s.parse(s.record(3))
    # names: rename all columns, or select among target0..
    assert open_source(d, targets=["gap", "energy"]).record(0).targets == {"gap": 0.5, "energy": 1.0}
    assert open_source(d, targets="target1").record(0).targets == {"target1": 1.0}
    with pytest.raises(ValueError, match="target7"):
        open_source(d, targets=["target7"])
    # sha256: stable, and changes with any CIF
    h = s.sha256()
    assert h == open_source(d).sha256() and len(h) == 64
    (d / "x3.cif").write_text(GOOD.replace("4.5", "4.6"))
    assert open_source(d).sha256() != h
    (d / "x3.cif").write_text(GOOD)
    assert open_source(d).sha256() == h
    assert s.describe()["fmt"] == "cgcnn"


# ------------------------------------------------------------------ extxyz / ase
def test_extxyz(tmp_path):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write
    bulk = Atoms("NaCl", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=[[4, 0, 0], [1, 4, 0], [0, 0, 5]],
                 pbc=True)
    bulk.info.update(id="bulk-1", band_gap=3.2)
    bulk.calc = SinglePointCalculator(bulk, energy=-6.0)
    slab = Atoms("Cu2", positions=[[0, 0, 0], [1.2, 1.2, 1.5]], cell=[3, 3, 20], pbc=[True, True, False])
    slab.info.update(name=7.0, band_gap="oops")
    mol = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], pbc=False)
    mol.info.update(band_gap=5.0)
    path = tmp_path / "frames.extxyz"
    write(path, [bulk, slab, mol], format="extxyz")

    s = open_source(path)
    assert s.fmt == "extxyz" and len(s) == 3
    assert s.target_names() == ["band_gap", "energy", "energy_per_atom"]
    # one id key for the whole file ("id" and "name" tie at one frame each: "id" comes first);
    # frames without it are rejects, not ids made from their position
    assert [s.record(k).id for k in range(3)] == ["bulk-1", None, None]
    assert [s.record(k).problem and s.record(k).problem[0] for k in range(3)] == \
        [None, "missing_id", "missing_id"]
    assert open_source(path, id_key="name").record(1).problem == \
        ("non_numeric_label", "band_gap: 'oops' is not a number")
    t0 = s.record(0).targets
    assert t0["band_gap"] == 3.2 and t0["energy"] == -6.0 and t0["energy_per_atom"] == -3.0
    t1 = s.record(1).targets
    assert all(math.isnan(v) for v in t1.values())
    c = s.parse(s.record(0))
    assert c.numbers.tolist() == [11, 17] and c.pbc.all()
    assert np.allclose(c.frac, [[0, 0, 0], [0.5, 0.5, 0.5]]) and np.allclose(c.cart, bulk.positions)
    c = s.parse(s.record(1))
    assert c.pbc.tolist() == [True, True, False] and np.allclose(c.cart, slab.positions)
    with pytest.raises(ParseError, match="non-periodic structure without a cell"):
        s.parse(s.record(2))
    sel = open_source(path, targets=["energy"])
    assert sel.record(0).targets == {"energy": -6.0}
    with pytest.raises(ValueError, match="enthalpy"):
        open_source(path, targets=["enthalpy"])
    assert len(s.sha256()) == 64 and s.sha256() == open_source(path, fmt="ase").sha256()
    assert open_source(path, fmt="ase").record(0).id == "bulk-1"


def test_dummy_species_passed_through_as_zero(tmp_path):
    # pymatgen reads an unknown symbol as a DummySpecies; the reader passes Z=0 on (the builder rejects it)
    p = _write_json(tmp_path / "d.json", [{"id": 5, "cif": p1_cif([("X", 0, 0, 0), ("O", 0.5, 0.5, 0.5)])}])
    s = open_source(p)
    assert s.record(0).id == "5" and s.target_names() == []
    assert s.parse(s.record(0)).numbers.tolist() == [0, 8]
