"""Structures → sharded LMDB: build, rejects, verify, info, kill-and-resume, MPI ranks."""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from uae_dist.data import CrystalGraphDataset
from uae_dist.data.build import BuildError, build_lmdb, make_split
from uae_dist.data.graph import decode_record
from uae_dist.data.verify import verify

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

CIF = """data_x
_symmetry_space_group_name_H-M 'P 1'
_cell_length_a {a}
_cell_length_b {b}
_cell_length_c {c}
_cell_angle_alpha {al}
_cell_angle_beta {be}
_cell_angle_gamma {ga}
_symmetry_Int_Tables_number 1
loop_
 _symmetry_equiv_pos_as_xyz
  'x, y, z'
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
  {el} {el}0 0.0 0.0 0.0 1
"""


def cif(el="Fe", a=2.9, b=2.9, c=2.9, al=90, be=90, ga=90):
    return CIF.format(el=el, a=a, b=b, c=c, al=al, be=be, ga=ga)


@pytest.fixture(scope="module")
def mp_records(mp_path):
    return json.load(gzip.open(mp_path))


def write_json(path, records):
    with gzip.open(path, "wt") as fh:
        json.dump(records, fh)
    return path


BAD = {  # reason → record that must be rejected for it
    "parse_error": {"material_id": "bad-parse", "cif": "this is not a CIF", "e_form_per_atom": -1.0, "band_gap": 0.0},
    "element_out_of_range": {"material_id": "bad-z", "cif": cif("Md"), "e_form_per_atom": -1.0, "band_gap": 0.0},
    "non_finite_lattice": {"material_id": "bad-lat", "cif": cif(a="nan"), "e_form_per_atom": -1.0, "band_gap": 0.0},
    "no_neighbors": {"material_id": "bad-isolated", "cif": cif(a=30, b=30, c=30), "e_form_per_atom": -1.0,
                     "band_gap": 0.0},
    "label_out_of_bounds": {"material_id": "bad-label", "cif": cif(), "e_form_per_atom": -13.57, "band_gap": 0.0},
    "non_finite_label": {"material_id": "bad-inf", "cif": cif(), "e_form_per_atom": -1.0, "band_gap": float("inf")},
}


@pytest.fixture(scope="module")
def small_source(tmp_path_factory, mp_records):
    """40 real MP records with every kind of bad record mixed in, and a duplicate id."""
    recs = [dict(r) for r in mp_records[:40]]
    bad = list(BAD.values())
    for k, r in enumerate(bad):
        recs.insert(3 + 5 * k, r)
    recs.append(dict(mp_records[5]))  # duplicate id of a good record
    return write_json(tmp_path_factory.mktemp("src") / "small.json.gz", recs), recs


@pytest.fixture(scope="module")
def small_build(tmp_path_factory, small_source):
    path, _ = small_source
    out = tmp_path_factory.mktemp("build") / "ds"
    m = build_lmdb(path, out, targets="e_form_per_atom,band_gap", shards=3, workers=1, progress=False, use_mpi=False)
    return out, m


def test_build_counts_and_manifest(small_build, small_source):
    out, m = small_build
    _, recs = small_source
    assert m["counts"]["source"] == len(recs)
    assert m["counts"]["records"] == 40 and m["counts"]["rejected"] == len(BAD) + 1
    assert m["targets"]["names"] == ["e_form_per_atom", "band_gap"]
    for key in ("schema_version", "identity", "shards", "elements", "split"):
        assert key in m
    assert len(m["shards"]) == 3 and sum(s["count"] for s in m["shards"]) == 40
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    assert len(m["records"]["natoms"]) == len(m["records"]["nedges"]) == 40
    assert m["options"]["cutoff"] == 8.0
    st = m["targets"]["stats"]["e_form_per_atom"]
    assert st["count"] == 40 and st["min"] >= -4.5
    assert (out / "split.json").exists() and (out / "rejects.jsonl").exists()


@pytest.mark.parametrize("reason", list(BAD) + ["duplicate_id"])
def test_each_reject_reason_is_reported(small_build, reason):
    out, _ = small_build
    rejects = [json.loads(ln) for ln in (out / "rejects.jsonl").read_text().splitlines()]
    hits = [r for r in rejects if r["reason"] == reason]
    assert len(hits) == 1, rejects
    r = hits[0]
    assert r["id"] and r["detail"] and isinstance(r["index"], int)
    if reason == "duplicate_id":
        assert r["id"] == "mp-" + r["id"].split("-", 1)[1] and "already used" in r["detail"]
    else:
        assert r["id"] == BAD[reason]["material_id"]


def test_extxyz_rejects_degenerate_cell_and_nan_positions(tmp_path):
    """Reasons a CIF cannot express (pymatgen refuses such CIFs outright) arrive through extxyz."""
    from ase import Atoms
    from ase.io import write

    good = Atoms("Fe2", scaled_positions=[[0, 0, 0], [.5, .5, .5]], cell=np.eye(3) * 2.87, pbc=True)
    good.info.update(id="good", energy_per_atom_ref=-8.3)
    flat = Atoms("Fe", positions=[[0, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [3, 3, 1e-9]], pbc=True)
    flat.info.update(id="flat", energy_per_atom_ref=-8.0)
    nan = good.copy()
    nan.positions[1, 2] = np.nan
    nan.info.update(id="nan-pos", energy_per_atom_ref=-8.0)
    src = tmp_path / "frames.extxyz"
    write(src, [good, flat, nan], format="extxyz")
    m = build_lmdb(src, tmp_path / "out", shards=1, progress=False, use_mpi=False)
    assert m["records"]["ids"] == ["good"]
    reasons = {json.loads(ln)["id"]: json.loads(ln)["reason"] for ln in (tmp_path / "out/rejects.jsonl").open()}
    assert reasons == {"flat": "degenerate_lattice", "nan-pos": "non_finite_coordinates"}


def test_records_round_trip(small_build, small_source):
    out, _ = small_build
    from pymatgen.core import Structure

    ds = CrystalGraphDataset(out, split=None, dtype=__import__("torch").float64)
    _, recs = small_source
    by_id = {r["material_id"]: r for r in recs}
    for k in range(0, len(ds), 7):
        g = ds[k]
        s = Structure.from_str(by_id[g.id]["cif"], fmt="cif")
        assert g.z.tolist() == list(s.atomic_numbers)
        np.testing.assert_allclose(g.pos.numpy(), s.cart_coords, atol=1e-8)
        np.testing.assert_allclose(g.cell[0].numpy(), s.lattice.matrix, atol=1e-8)
        assert g.y[0, 0].item() == pytest.approx(by_id[g.id]["e_form_per_atom"])
        c, p, img, _ = s.get_neighbor_list(8.0)
        ref = set(zip(c.tolist(), p.tolist(), map(tuple, np.rint(img).astype(int).tolist())))
        ours = set(zip(g.edge_index[0].tolist(), g.edge_index[1].tolist(), map(tuple, g.shift.tolist())))
        assert ours == ref


def test_per_atom_targets_derived_from_the_source(tmp_path, mp_records):
    """``KEY_per_atom`` for a source with only ``KEY`` (MP's cell volume and magnetic moment) is
    KEY over the atom count of that record, checked against pymatgen's structure."""
    from pymatgen.core import Structure

    recs = mp_records[:12]
    src = write_json(tmp_path / "mp12.json.gz", recs)
    m = build_lmdb(src, tmp_path / "ds", targets="e_form_per_atom,volume_per_atom,magmom_per_atom",
                   shards=1, workers=1, progress=False, use_mpi=False)
    assert m["targets"]["names"] == ["e_form_per_atom", "volume_per_atom", "magmom_per_atom"]
    assert m["source"]["per_atom"] == {"volume_per_atom": "volume", "magmom_per_atom": "magmom"}
    ds = CrystalGraphDataset(tmp_path / "ds", split=None, dtype=__import__("torch").float64)
    by_id = {r["material_id"]: r for r in recs}
    for g in (ds[k] for k in range(len(ds))):
        r, n = by_id[g.id], len(Structure.from_str(by_id[g.id]["cif"], fmt="cif"))
        assert n > 1 or g.id == "mp-1"
        np.testing.assert_allclose(g.y[0].numpy(), [r["e_form_per_atom"], r["volume"] / n,
                                                    r["magmom"] / n], rtol=1e-12)
    with pytest.raises(ValueError, match="KEY_per_atom"):
        build_lmdb(src, tmp_path / "bad", targets="band_gap_per_atomm", shards=1,
                   progress=False, use_mpi=False)


def test_split_is_deterministic_partition(small_build):
    out, m = small_build
    sp = json.loads((out / "split.json").read_text())
    ids = m["records"]["ids"]
    assert sorted(sp["train"] + sp["val"] + sp["test"]) == sorted(ids)
    assert (len(sp["train"]), len(sp["val"]), len(sp["test"])) == (32, 4, 4)
    again = make_split(list(reversed(ids)), (0.8, 0.1, 0.1), 0)
    assert again["train"] == sp["train"] and again["test"] == sp["test"]
    assert make_split(ids, (0.8, 0.1, 0.1), 1)["train"] != sp["train"]


def test_split_is_stable_when_records_change():
    ids = [f"mp-{k}" for k in range(1000)]
    a = make_split(ids)
    b = make_split(ids[:500] + ids[501:])  # one record rejected under other bounds
    where = {rid: part for part, members in a.items() for rid in members}
    moved = [rid for part, members in b.items() for rid in members if where[rid] != part]
    assert len(moved) <= 2, moved


def test_verify_ok_then_detects_damage(small_build, tmp_path):
    out, m = small_build
    assert verify(out, progress=False) == []
    dmg = tmp_path / "damaged"
    shutil.copytree(out, dmg)
    shard = dmg / m["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(dmg, progress=False)
    assert any("sha256" in p for p in problems)
    (dmg / m["shards"][0]["file"]).unlink()
    assert any("missing" in p for p in verify(dmg, progress=False))
    r = subprocess.run([BIN / "uae-dist", "data", "verify", str(dmg), "-q"], capture_output=True, text=True)
    assert r.returncode == 1 and "DAMAGED" in r.stdout


def test_cli_info_and_verify(small_build):
    out, _ = small_build
    r = subprocess.run([BIN / "uae-dist", "data", "info", str(out)], capture_output=True, text=True, check=True)
    assert "records    40 of 47" in r.stdout and "label_out_of_bounds 1" in r.stdout
    r = subprocess.run([BIN / "uae-dist", "data", "info", str(out), "--json"], capture_output=True, text=True,
                       check=True)
    assert json.loads(r.stdout)["counts"]["records"] == 40
    png = out.parent / "info.png"
    subprocess.run([BIN / "uae-dist", "data", "info", str(out), "--plot", str(png)], check=True, capture_output=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    r = subprocess.run([BIN / "uae-dist", "data", "verify", str(out), "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_existing_build_is_not_clobbered(small_build, small_source):
    out, _ = small_build
    with pytest.raises(BuildError, match="complete build"):
        build_lmdb(small_source[0], out, shards=3, progress=False, use_mpi=False)


def test_empty_source_is_a_clear_error(tmp_path):
    src = write_json(tmp_path / "empty.json.gz", [])
    with pytest.raises((BuildError, ValueError), match="no records|empty"):
        build_lmdb(src, tmp_path / "o", progress=False, use_mpi=False)


def _records(out):
    ds = CrystalGraphDataset(out, split=None, dtype=__import__("torch").float64)
    return {ds.ids[k]: ds.raw(k) for k in range(len(ds))}


def _same_records(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for f in ("z", "pos", "cell", "i", "j", "shift", "y"):
            np.testing.assert_array_equal(a[k][f], b[k][f], err_msg=f"{k}.{f}")


def test_workers_and_shards_give_same_records(small_build, small_source, tmp_path):
    out, m = small_build
    m2 = build_lmdb(small_source[0], tmp_path / "w2", targets="e_form_per_atom,band_gap", shards=2, workers=2,
                    progress=False, use_mpi=False)
    assert m2["records"]["ids"] == m["records"]["ids"]
    _same_records(_records(out), _records(tmp_path / "w2"))


def test_kill_and_resume(mp_records, tmp_path):
    src = write_json(tmp_path / "src.json.gz", mp_records[:300])
    ref = tmp_path / "ref"
    build_lmdb(src, ref, shards=2, progress=False, use_mpi=False, commit_every=8)
    out = tmp_path / "killed"
    cmd = [str(BIN / "uae-dist"), "data", "build", "--source", str(src), "--out", str(out), "--shards", "2",
           "--workers", "2", "--commit-every", "8", "--no-fast-cif"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    # kill once some, but not all, records are committed
    while time.time() < deadline:
        shards = list((out / "shards").glob("*.lmdb")) if (out / "shards").exists() else []
        if shards and sum(s.stat().st_size for s in shards) > 200_000:
            break
        time.sleep(0.05)
    import psutil

    workers = psutil.Process(p.pid).children(recursive=True)
    assert workers, "expected worker processes"
    os.kill(p.pid, signal.SIGKILL)  # the main process only: its workers must not outlive it
    p.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"orphaned build workers still running: {alive}"
    assert not (out / "manifest.json").exists(), "build finished before the kill; the test needs a bigger source"
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = subprocess.run(cmd + ["--resume", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((out / "manifest.json").read_text())
    mref = json.loads((ref / "manifest.json").read_text())
    assert m["records"]["ids"] == mref["records"]["ids"]
    assert len(set(m["records"]["ids"])) == len(m["records"]["ids"])
    _same_records(_records(ref), _records(out))
    assert verify(out, progress=False) == []


def test_mpi_two_ranks_equal_one_process(mp_records, tmp_path):
    mpirun = BIN / "mpirun"
    if not mpirun.exists():
        pytest.skip("mpirun not installed")
    src = write_json(tmp_path / "src.json.gz", mp_records[:60])
    one = tmp_path / "one"
    build_lmdb(src, one, shards=4, progress=False, use_mpi=False)
    two = tmp_path / "two"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    r = subprocess.run([str(mpirun), "-np", "2", "--oversubscribe", str(BIN / "uae-dist"), "data", "build",
                        "--source", str(src), "--out", str(two), "--shards", "4", "-q"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((two / "manifest.json").read_text())
    assert m["build"]["processes"] == 2
    _same_records(_records(one), _records(two))


def test_srun_without_mpi_is_refused(tmp_path, monkeypatch, mp_records):
    """Two srun tasks that cannot see each other would both write every shard: refuse clearly."""
    src = write_json(tmp_path / "src.json.gz", mp_records[:4])
    r = subprocess.run([str(BIN / "uae-dist"), "data", "build", "--source", str(src), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="2"))
    assert r.returncode == 2 and "srun" in r.stderr and "--mpi=pmix" in r.stderr
