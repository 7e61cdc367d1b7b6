"""Issue 8, the build itself: no hang when a worker dies (3), bounded memory per structure (4),
overwrite only what it wrote (7), numbers refused before anything starts (8), unusable output
paths (9). Real MP records, real processes killed with real signals."""
import json
import os
import re
import resource
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from _data_fixtures import BIN, cli, manifest, mp_records, reject_rows, rejects, write_json
from uae_dist.data import CrystalGraphDataset
from uae_dist.data.build import build_lmdb

pytestmark = pytest.mark.timeout(300)


def build(src, out, **kw):
    kw.setdefault("shards", 1)
    return build_lmdb(src, out, progress=False, use_mpi=False, **kw)


def _records(out):
    ds = CrystalGraphDataset(out, split=None, dtype=__import__("torch").float64)
    return {ds.ids[k]: ds.raw(k) for k in range(len(ds))}


# ------------------------------------------------------------------ 8.3 a dead worker
@pytest.mark.timeout(600)
def test_dead_worker_fails_the_build_quickly_and_resume_completes(tmp_path):
    import psutil

    src = write_json(tmp_path / "src.json.gz", mp_records(300))
    ref = tmp_path / "ref"
    build(src, ref, shards=2)
    out = tmp_path / "o"
    cmd = [str(BIN / "uae-dist"), "data", "build", "--source", str(src), "--out", str(out),
           "--shards", "2", "--workers", "2", "--commit-every", "8", "--no-fast-cif", "-q"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # both workers started and some records committed
            shards = list((out / "shards").glob("*.lmdb")) if (out / "shards").exists() else []
            if len(shards) == 2 and sum(s.stat().st_size for s in shards) > 200_000:
                break
            time.sleep(0.05)
        workers = [c for c in psutil.Process(p.pid).children(recursive=True)
                   if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 2, workers
        os.kill(workers[0].pid, signal.SIGKILL)  # what the OOM killer does
        t0 = time.time()
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the build hangs after one of its workers was killed")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert time.time() - t0 < 60
    assert p.returncode == 2, err
    assert "killed by signal 9" in err and "--resume" in err and "shard" in err, err
    assert not (out / "manifest.json").exists()
    _, alive = psutil.wait_procs(workers[1:], timeout=15)
    assert not alive, "the surviving worker was left running"
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert manifest(out)["records"]["ids"] == manifest(ref)["records"]["ids"]
    a, b = _records(ref), _records(out)
    for rid in a:
        for f in ("z", "pos", "cell", "i", "j", "shift", "y"):
            np.testing.assert_array_equal(a[rid][f], b[rid][f])


# ------------------------------------------------------------------ 8.4 memory per structure
def _tiny_cell(rec: dict, a: float) -> dict:
    """A real one-atom MP record (mp-1, Cs) with its cell shrunk to edges of ``a`` Å."""
    r = dict(rec, material_id=f"tiny-{a}")
    r["cif"] = re.sub(r"(_cell_length_[abc]\s+)\S+", rf"\g<1>{a}", rec["cif"])
    return r


def _limit_memory():  # a regression allocates GBs for one record: fail it, not the machine
    resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))


@pytest.mark.timeout(200)
def test_tiny_cell_is_rejected_before_its_neighbour_search(tmp_path):
    recs = mp_records(6)
    assert recs[0]["material_id"] == "mp-1" and recs[0]["cif"].count(" Cs0 ") == 1
    src = write_json(tmp_path / "s.json.gz", recs + [_tiny_cell(recs[0], 0.1),
                                                      _tiny_cell(recs[0], 0.05)])
    r = cli("data", "build", "--source", src, "--out", tmp_path / "o", "--shards", 1, "-q",
            timeout=150, preexec_fn=_limit_memory)
    assert r.returncode == 0, r.stderr
    rows = {x["id"]: x for x in reject_rows(tmp_path / "o")}
    assert {k: v["reason"] for k, v in rows.items()} == {"tiny-0.1": "too_many_neighbors",
                                                       "tiny-0.05": "too_many_neighbors"}
    assert "--max-pairs" in rows["tiny-0.1"]["detail"]
    assert manifest(tmp_path / "o")["counts"]["records"] == 6


def test_pair_cap_is_configurable_and_tracks_real_edge_counts(tmp_path):
    src = write_json(tmp_path / "s.json.gz", mp_records(60))
    full = build(src, tmp_path / "all", cutoff=6.0)
    nedges = dict(zip(full["records"]["ids"], full["records"]["nedges"]))
    cap = int(np.median(list(nedges.values())))
    capped = build(src, tmp_path / "cap", cutoff=6.0, max_pairs=cap)
    cut = {r["id"] for r in reject_rows(tmp_path / "cap") if r["reason"] == "too_many_neighbors"}
    assert cut and set(capped["records"]["ids"]) == set(nedges) - cut
    # the estimate is the edge count within tens of per cent: the cap means what it says
    assert all(nedges[i] > cap * 0.6 for i in cut)
    assert all(n < cap * 1.6 for i, n in nedges.items() if i not in cut)


# ------------------------------------------------------------------ 8.7 overwrite only ours
def test_overwrite_refuses_a_directory_holding_foreign_files(tmp_path):
    src = write_json(tmp_path / "s.json.gz", mp_records(10))
    out = tmp_path / "o"
    build(src, out)
    (out / "notes.txt").write_text("mine")
    (out / "shards" / "README").write_text("mine too")
    before = sorted(p.name for p in out.rglob("*"))
    r = cli("data", "build", "--source", src, "--out", out, "--shards", 1, "--overwrite", "-q")
    assert r.returncode == 2 and "did not write" in r.stderr and "notes.txt" in r.stderr
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing deleted
    (out / "notes.txt").unlink()
    (out / "shards" / "README").unlink()
    r = cli("data", "build", "--source", src, "--out", out, "--shards", 2, "--overwrite", "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "shards").glob("*.lmdb")) == [
        "shard-00000-of-00002.lmdb", "shard-00001-of-00002.lmdb"]  # no stale shard of the old one


def test_overwrite_never_deletes_another_tools_manifest(tmp_path):
    src = write_json(tmp_path / "s.json.gz", mp_records(4))
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text('{"tool": "something else"}')
    r = cli("data", "build", "--source", src, "--out", out, "--shards", 1, "--overwrite", "-q")
    assert r.returncode == 2 and "manifest.json" in r.stderr
    assert (out / "manifest.json").read_text() == '{"tool": "something else"}'


# ------------------------------------------------------------------ 8.8 numbers that are refused
def test_huge_label_is_rejected_and_no_json_holds_infinity(tmp_path):
    recs = mp_records(10)
    recs[3]["volume"] = 1e308  # no sanity bound covers volume: the magnitude bound does
    recs[6]["magmom"] = -1e300
    out = tmp_path / "o"
    m = build(write_json(tmp_path / "s.json.gz", recs), out)
    assert rejects(out) == {recs[3]["material_id"]: "label_out_of_bounds",
                            recs[6]["material_id"]: "label_out_of_bounds"}

    def refuse(c):
        raise AssertionError(f"non-finite JSON constant {c}")
    for name in ("manifest.json", "split.json"):
        json.loads((out / name).read_text(), parse_constant=refuse)
    st = m["targets"]["stats"]["volume"]
    assert st["count"] == 8 and np.isfinite([st["mean"], st["std"], st["max"]]).all()


BAD_OPTIONS = [(["--bound", "band_gap=5:1"], "--bound"), (["--bound", "band_gap=nan:1"], "--bound"),
               (["--cutoff", "nan"], "--cutoff"), (["--cutoff", "-1"], "--cutoff"),
               (["--cutoff", "0"], "--cutoff"), (["--split", "0.9,0.2,0.1"], "--split"),
               (["--split", "0.8,0.2"], "--split"), (["--shards", "0"], "--shards"),
               (["--limit", "0"], "--limit"), (["--max-neighbors", "0"], "--max-neighbors"),
               (["--max-pairs", "0"], "--max-pairs"), (["--workers", "0"], "--workers"),
               (["--commit-every", "0"], "--commit-every")]


@pytest.mark.parametrize("args,option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_exit_2_naming_it_and_leaves_nothing(tmp_path, args, option):
    src = write_json(tmp_path / "s.json.gz", mp_records(4))
    out = tmp_path / "new" / "o"
    r = cli("data", "build", "--source", src, "--out", out, "-q", *args, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert option in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()


def test_options_are_checked_before_the_source_is_opened(tmp_path):
    r = cli("data", "build", "--source", tmp_path / "no-such.json", "--out", tmp_path / "o",
            "--cutoff", "nan", timeout=60)
    assert r.returncode == 2 and "--cutoff" in r.stderr and "no-such" not in r.stderr


def test_build_that_keeps_nothing_fails_and_a_rerun_just_works(tmp_path):
    src = write_json(tmp_path / "s.json.gz", mp_records(8))
    out = tmp_path / "o"
    r = cli("data", "build", "--source", src, "--out", out, "--shards", 2, "-q",
            "--bound", "e_form_per_atom=10:20")
    assert r.returncode == 2 and "no record kept" in r.stderr, r.stderr
    assert not (out / "manifest.json").exists()
    assert set(rejects(out).values()) == {"label_out_of_bounds"} and len(rejects(out)) == 8
    r = cli("data", "build", "--source", src, "--out", out, "--shards", 2, "-q")  # no flags
    assert r.returncode == 0, r.stderr
    assert manifest(out)["counts"]["records"] == 8 and not rejects(out)


# ------------------------------------------------------------------ 8.9 unusable output paths
@pytest.mark.parametrize("kind", ["file", "under_a_file", "not_writable"])
def test_unusable_out_is_a_clear_error(tmp_path, kind):
    src = write_json(tmp_path / "s.json.gz", mp_records(4))
    (tmp_path / "f").write_text("a file")
    out = {"file": tmp_path / "f", "under_a_file": tmp_path / "f" / "sub",
           "not_writable": Path("/sys/uae-dist-test-out")}[kind]
    r = cli("data", "build", "--source", src, "--out", out, "-q", timeout=60)
    assert r.returncode == 2 and "--out" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "f").read_text() == "a file"
