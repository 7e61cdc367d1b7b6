"""The experiment matrix: schema errors, cell order and hash, and real runs of the engine (cells
in parallel, skip when done, a failing cell, --cell K, kill and resume, the data-set lock)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from _matrix_fixtures import (cli, popen, read_json, small_matrix, smoke_dict, train_rows,
                              wait_unlocked, write_matrix)
from _train_fixtures import MP
from uae_dist.experiments import cells as C
from uae_dist.experiments import record
from uae_dist.experiments.datasets import manifest_sha256
from uae_dist.experiments.matrix import plan, status
from uae_dist.experiments.schema import MatrixError, load_matrix

CONFIGS = Path(__file__).resolve().parents[1] / "uae_dist" / "configs"


def _load(tmp_path, d, name="m.yaml"):
    return load_matrix(write_matrix(tmp_path / name, d), out_root=str(tmp_path / "runs"))


# --------------------------------------------------------------------------- schema
@pytest.mark.parametrize("edit, words", [
    (lambda d: d["backbones"]["ct"].update(budjet={}), ["backbones.ct.budjet", "'budget'"]),
    (lambda d: d.update(seed=[0]), ["seed", "did you mean 'seeds'"]),
    (lambda d: d.pop("out_root"), ["out_root", "required"]),
    (lambda d: d["tasks"]["ef"].update(dataset="nope"), ["tasks.ef.dataset", "'nope'"]),
    (lambda d: d["featurizers"]["learned8"]["overrides"].update({"train.epochs": 3}),
     ["featurizers.learned8", "train.epochs", "budget"]),
    (lambda d: d["overrides"].update({"train.seed": 3}), ["overrides.train.seed", "seeds"]),
    (lambda d: d["datasets"]["mp_tiny"]["build"].update(cutof=5), ["build.cutof", "'cutoff'"]),
    (lambda d: d["backbones"]["ct"].update(default_featurizer="x"),
     ["backbones.ct.default_featurizer", "'x'"]),
    (lambda d: d.update(seeds=[0, 0]), ["seeds", "repeat"]),
    (lambda d: d.update(exclude=[{"seed": 7}]), ["exclude[0].seed", "7"]),
    (lambda d: d["run"].update(jobs=0), ["run.jobs", ">= 1"]),
    (lambda d: d["featurizers"].update({"a b": {}}), ["'a b'", "not a valid name"]),
])
def test_schema_errors_name_the_key(tmp_path, edit, words):
    d = smoke_dict()
    edit(d)
    with pytest.raises(MatrixError) as e:
        _load(tmp_path, d)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_cells_order_overrides_and_hash(tmp_path):
    d = smoke_dict()
    d["seeds"] = [3, 1]
    d["featurizers"]["learned8"]["per_backbone"] = {"ct": {"model.emb_dim": 4}}
    d["backbones"]["ct"]["task_budgets"] = {"ef": {"train.max_steps": 5}}
    m = _load(tmp_path, d)
    cells = C.expand(m)
    assert [c.name for c in cells] == ["ct/ef/learned16/seed3", "ct/ef/learned16/seed1",
                                       "ct/ef/learned8/seed3", "ct/ef/learned8/seed1"]
    assert [c.index for c in cells] == [0, 1, 2, 3]
    ov = C.cell_overrides(m, cells[2])
    # per_backbone wins over the featurizer's own value; the task budget over the budget
    assert ov["model.emb_dim"] == 4 and ov["train.max_steps"] == 5 and ov["train.epochs"] == 2
    assert ov["train.seed"] == 3 and ov["data.targets"] == ["e_form_per_atom"]
    assert ov["train.out_dir"] == str((m.out_root / "ct/ef/learned8/seed3").resolve())
    rs = plan(m)
    assert all(r.error is None for r in rs) and len({r.hash for r in rs}) == 4
    assert rs[2].config["model"]["emb_dim"] == 4 and rs[2].config["train"]["seed"] == 3
    # the hash ignores where the results go, not what is trained
    moved = load_matrix(m.path, out_root=str(tmp_path / "elsewhere"))
    assert [r.hash for r in plan(moved)] == [r.hash for r in rs]
    d["backbones"]["ct"]["budget"]["train.max_steps"] = 7
    d["backbones"]["ct"].pop("task_budgets")
    assert plan(_load(tmp_path, d, "m2.yaml"))[0].hash != rs[0].hash


def test_exclude_and_invalid_cell_listed(tmp_path, monkeypatch, capsys):
    from uae_dist.cli import main

    d = smoke_dict()
    d["featurizers"]["typo"] = {"overrides": {"model.emb_dimm": 8}}
    d["exclude"] = [{"featurizer": "learned8", "seed": 1}]
    f = write_matrix(tmp_path / "m.yaml", d)
    monkeypatch.chdir(tmp_path)
    assert main(["matrix", "list", str(f)]) == 0
    out = capsys.readouterr().out
    assert "ct/ef/learned8/seed1" not in out and "ct/ef/learned8/seed0" in out
    assert any("invalid" in ln and "model.emb_dimm" in ln and "'emb_dim'" in ln
               for ln in out.splitlines())
    assert "5 cells (2 invalid, 3 todo)" in out and "--array=0-4" in out
    assert main(["matrix", "list", str(f), "--count"]) == 0
    assert capsys.readouterr().out.strip() == "5"
    assert main(["matrix", "run", str(f), "--cell", "5"]) == 2
    assert "cells 0 to 4" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_shipped_matrices_parse():
    m = load_matrix(CONFIGS / "matrix_cpu.yaml")
    assert len(m.backbones) == 3 and len(m.tasks) == 2 and len(m.seeds) >= 3
    assert all(len(b.featurizers) == 4 for b in m.backbones.values())
    assert len(C.expand(m)) == 3 * 4 * 2 * len(m.seeds)
    assert len(C.expand(load_matrix("matrix_smoke"))) == 4
    u = load_matrix("matrix_uae")      # issue 10: cgcnn on both tasks, megnet on HOIP only
    assert u.reuse == (Path("runs/matrix_cpu"),) and u.backbones["megnet"].tasks == ("hoip_ae",)
    assert len(C.expand(u)) == len(u.featurizers) * 3 * len(u.seeds)


def test_stale_cell_is_detected_and_moved_aside(tmp_path):
    m = _load(tmp_path, smoke_dict())
    r = plan(m)[0]
    r.dir.mkdir(parents=True)
    record.write_json(r.dir / record.CELL, {"config_hash": "f" * 64, "status": "failed"})
    assert status(r, {}) == "stale"
    dest = record.move_aside(r.dir, "f" * 64)
    assert dest.name == "seed0.stale-ffffffff" and (dest / record.CELL).exists()
    assert not r.dir.exists() and status(r, {}) == "todo"


# --------------------------------------------------------------------------- real runs
def test_parallel_run_writes_metrics(small_run):
    work, f, out, p, wall = small_run
    assert p.returncode == 1, p.stderr[-3000:]  # the broken cell fails, the others finish
    done = [r for r in plan(load_matrix(f, out_root=str(out))) if r.cell.featurizer != "broken"]
    assert len(done) == 4
    spans = []
    for r in done:
        mt = read_json(r.dir / "metrics.json")
        assert mt["config_hash"] == r.hash and mt["cell"] == r.cell.name
        assert (mt["backbone"], mt["featurizer"], mt["seed"]) == \
            (r.cell.backbone, r.cell.featurizer, r.cell.seed)
        tm = read_json(r.dir / "test_metrics.json")["targets"]["e_form_per_atom"]
        assert mt["test"]["mae"] == tm["mae"] and mt["test"]["r2"] == tm["r2"]
        assert mt["units"] == "eV/atom" and mt["n_test"] == mt["test"]["count"] == 12
        assert mt["data_manifest_sha256"] == manifest_sha256(work / "data_build/matrix_smoke_mp")
        assert mt["train_time_s"] > 0 and mt["wall_time_s"] > mt["train_time_s"]
        assert (r.dir / "predictions_test.csv").read_text().count("\n") == 13
        a = read_json(r.dir / record.CELL)["attempts"][0]
        spans.append((a["t0"], a["t0"] + a["wall_s"]))
    # 2 at a time: some two cells ran at the same moment, never three
    overlaps = [sum(s <= t < e for s, e in spans) for t, _ in spans]
    assert max(overlaps) == 2, spans
    assert "4 done, 1 failed" in p.stderr


def test_failed_cell_is_reported_and_the_rest_finish(small_run):
    work, f, out, p, wall = small_run
    cell = out / "ct" / "ef" / "broken" / "seed0"
    rec = read_json(cell / "cell.json")
    assert rec["status"] == "failed" and rec["exit_code"] == 2
    assert "cutoff" in rec["error"] and not (cell / "metrics.json").exists()
    assert "FAILED [4] ct/ef/broken/seed0  exit 2" in p.stderr
    assert str(cell / "cell.log") in p.stderr
    assert "cutoff" in (cell / "cell.log").read_text()


def test_rerun_skips_done_cells(small_run):
    work, f, out, p, wall = small_run
    done = out / "ct" / "ef" / "learned8" / "seed1"
    before = (done / "metrics.json").stat().st_mtime_ns
    again = cli(["matrix", "run", f, "--jobs", "2"], cwd=work, check_rc=1)
    assert "4 skipped, 1 failed" in again.stderr
    assert "start  [4]" in again.stderr and "start  [0]" not in again.stderr
    assert (done / "metrics.json").stat().st_mtime_ns == before
    assert (done / "cell.log").read_text().count("=== ") == 1
    listing = cli(["matrix", "list", f], cwd=work, check_rc=0).stdout
    assert listing.count(" done ") == 4 and "failed   ct/ef/broken/seed0" in listing


def test_reuse_copies_done_cells_of_the_same_config(small_run):
    """A matrix naming ``reuse: [other out_root]`` copies that matrix's done cells of the same
    config hash and data instead of training them again; a cell of another hash is not reused."""
    work, f, out, p, wall = small_run
    d = smoke_dict()
    d["out_root"], d["reuse"] = "runs/matrix_reuse", [str(out.relative_to(work))]
    g = write_matrix(work / "reuse.yaml", d)
    again = cli(["matrix", "run", g, "--jobs", "2"], cwd=work, check_rc=0)
    assert "4 skipped" in again.stderr and "start  [" not in again.stderr
    assert again.stderr.count("reused [") == 4
    m = load_matrix(g, out_root=str(work / "runs/matrix_reuse"))
    for r in plan(m):
        mine, theirs = read_json(r.dir / "metrics.json"), read_json(out / r.dir.relative_to(
            m.out_root.resolve()) / "metrics.json")
        assert mine == theirs and mine["config_hash"] == r.hash
        assert (r.dir / "predictions_test.csv").exists() and not (r.dir / ".lock").exists()
    import dataclasses

    from uae_dist.experiments.matrix import _reuse
    r = plan(m)[0]
    m2 = dataclasses.replace(m, out_root=work / "runs/matrix_reuse2", reuse=(out,))
    here = work / "runs/matrix_reuse2" / r.dir.relative_to(m.out_root.resolve())
    assert _reuse(m2, dataclasses.replace(r, dir=here, hash="0" * 64), None) is None
    assert not here.exists()
    assert _reuse(m2, dataclasses.replace(r, dir=here), None)["config_hash"] == r.hash


@pytest.mark.skipif(not MP.exists(), reason="MP data set not found")
def test_killed_cells_resume_to_the_uninterrupted_result(small_run, tmp_path):
    """Cells 0 and 1 of the small matrix again, in a new out_root on an unbuilt data set: two
    --cell runners start at once (one builds the data set, the other waits for the lock); one
    is stopped by SIGTERM, the other SIGKILLed mid-training; rerunning resumes both from their
    checkpoints and gives exactly the metrics of the uninterrupted run of ``small_run``."""
    work, _, ref, _, _ = small_run
    d = small_matrix()
    d["datasets"]["mp_tiny"]["root"] = str(tmp_path / "data" / "mp_tiny")  # same build options
    f = write_matrix(tmp_path / "kill.yaml", d)
    killed = tmp_path / "killed"
    cell = {k: killed / "ct" / "ef" / "learned16" / f"seed{k}" for k in (0, 1)}
    procs = {k: popen(["matrix", "run", f, "--out-root", killed, "--cell", k], tmp_path)
             for k in (0, 1)}
    stop = {0: lambda: procs[0].send_signal(signal.SIGTERM),  # forwarded: checkpoint, stop
            1: lambda: os.kill(procs[1].pid, signal.SIGKILL)}  # the cell gets SIGTERM (pdeathsig)
    pending, t0 = {0, 1}, time.time()
    while pending:  # stop each cell as soon as it has taken 3 steps
        for k in sorted(pending):
            if train_rows(cell[k]) >= 3:
                stop[k]()
                pending.discard(k)
            elif procs[k].poll() is not None or time.time() - t0 > 600:
                raise AssertionError(f"cell {k} never trained: {procs[k].stdout.read()[-3000:]}")
        time.sleep(0.05)
    out0 = procs[0].communicate(timeout=300)[0]
    out1 = procs[1].communicate(timeout=60)[0]
    wait_unlocked(cell[1])
    assert procs[0].returncode == 75, out0[-3000:]
    assert "interrupted [0]" in out0
    assert (out0 + out1).count("data set mp_tiny: building") == 1, out0 + out1
    for k in (0, 1):
        name = (cell[k] / "checkpoints" / "latest").read_text().strip()
        meta = read_json(cell[k] / "checkpoints" / name / "state.json")
        assert meta["meta"]["status"] == "preempted" and meta["step"] < 16, (k, meta["step"])
        assert not (cell[k] / "metrics.json").exists()
    assert read_json(cell[0] / "cell.json")["status"] == "interrupted"
    # --cell K runs exactly cell K: only these two cell directories exist
    assert [p.name for p in (killed / "ct" / "ef").iterdir()] == ["learned16"]
    assert sorted(p.name for p in (killed / "ct" / "ef" / "learned16").iterdir()) == \
        ["seed0", "seed1"]

    again = {k: popen(["matrix", "run", f, "--out-root", killed, "--cell", k], tmp_path)
             for k in (0, 1)}
    for k, pr in again.items():
        text = pr.communicate(timeout=600)[0]
        assert pr.returncode == 0 and "1 done" in text, text[-3000:]
    for k in (0, 1):
        a = read_json(cell[k] / "metrics.json")
        b = read_json(ref / "ct" / "ef" / "learned16" / f"seed{k}" / "metrics.json")
        assert a["attempts"] == 2 and b["attempts"] == 1
        assert a["steps"] == b["steps"] == 16
        assert a["test"] == b["test"] and a["config_hash"] == b["config_hash"]
        assert (cell[k] / "predictions_test.csv").read_text() == \
            (ref / "ct" / "ef" / "learned16" / f"seed{k}" / "predictions_test.csv").read_text()
        assert "resumed from" in (cell[k] / "cell.log").read_text()
