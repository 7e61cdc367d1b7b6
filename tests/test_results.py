"""``uae-dist results``: the table of a real matrix run, checked against numbers computed here
from the cells' metrics.json files; missing and failed cells; the plots."""
from __future__ import annotations

import csv
import json
import shutil
import statistics

import pytest

from _matrix_fixtures import cli
from uae_dist.experiments.results import mean_std, pct_change


def _csv(p):
    with open(p, newline="") as fh:
        return list(csv.DictReader(fh))


def _metrics(out, fz):
    return [json.loads((out / "ct" / "ef" / fz / f"seed{s}" / "metrics.json").read_text())
            for s in (0, 1)]


def test_mean_std_and_pct_change_by_hand():
    m, s = mean_std([0.30, 0.50, None])
    assert m == pytest.approx(0.40) and s == pytest.approx(0.1414213562373095)
    assert mean_std([0.7]) == (0.7, None) and mean_std([None]) == (None, None)
    assert pct_change(0.3, 0.4) == pytest.approx(-25.0) and pct_change(1.0, None) is None


def test_table_matches_the_metrics_files(small_run, tmp_path):
    work, f, out, _, _ = small_run
    p = cli(["results", out, "--out", tmp_path / "res"], cwd=work, check_rc=0)
    rows = {r["featurizer"]: r for r in _csv(tmp_path / "res" / "results.csv")}
    assert set(rows) == {"learned16", "learned8", "broken"}
    ref = [m["test"]["mae"] for m in _metrics(out, "learned16")]
    alt = [m["test"]["mae"] for m in _metrics(out, "learned8")]
    assert float(rows["learned16"]["mae_mean"]) == pytest.approx(statistics.mean(ref), rel=1e-12)
    assert float(rows["learned16"]["mae_std"]) == pytest.approx(statistics.stdev(ref), rel=1e-12)
    assert float(rows["learned8"]["mae_std"]) == pytest.approx(statistics.stdev(alt), rel=1e-12)
    r2 = [m["test"]["r2"] for m in _metrics(out, "learned8")]
    assert float(rows["learned8"]["r2_mean"]) == pytest.approx(statistics.mean(r2), rel=1e-12)
    want = 100 * (statistics.mean(alt) - statistics.mean(ref)) / statistics.mean(ref)
    assert float(rows["learned8"]["mae_change_pct"]) == pytest.approx(want, rel=1e-9)
    assert rows["learned16"]["is_default"] == "True" and rows["learned16"]["mae_change_pct"] == ""
    assert rows["learned8"]["n_done"] == "2" and rows["learned8"]["seeds"] == "0 1"
    assert rows["broken"]["n_done"] == "0" and rows["broken"]["n_failed"] == "1"
    md = (tmp_path / "res" / "results.md").read_text()
    assert f"{statistics.mean(ref):.4f} ± {statistics.stdev(ref):.4f}" in md
    assert f"{want:+.1f} %" in md and "learned16 (default)" in md
    assert "failed: [4] ct/ef/broken/seed0: exit 2" in md and "cutoff" in md
    assert "4 of 5 cells done, 1 failed, 0 missing" in p.stderr
    cells = _csv(tmp_path / "res" / "cells.csv")
    assert sorted(c["status"] for c in cells) == ["done"] * 4 + ["failed"]
    for name in ("parity_ef.png", "curves_ef.png"):
        png = (tmp_path / "res" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_missing_cells_and_no_index(small_run, tmp_path):
    work, f, out, _, _ = small_run
    copy = tmp_path / "runs"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "ct" / "ef" / "learned8" / "seed1" / "metrics.json").unlink()
    p = cli(["results", copy, "--no-plots"], cwd=work, check_rc=0)
    assert "- missing: [3] ct/ef/learned8/seed1" in (copy / "results" / "results.md").read_text()
    assert "3 of 5 cells done, 1 failed, 1 missing" in p.stderr
    row = {r["featurizer"]: r for r in _csv(copy / "results" / "results.csv")}["learned8"]
    one = _metrics(out, "learned8")[0]["test"]["mae"]
    assert row["n_done"] == "1" and float(row["mae_mean"]) == one and row["mae_std"] == ""
    cli(["results", copy, "--no-plots", "--strict"], cwd=work, check_rc=1)
    # without matrix.json the cells come from the metrics files; defaults from their records
    (copy / "matrix.json").unlink()
    p = cli(["results", copy, "--no-plots"], cwd=work, check_rc=0)
    rows = {r["featurizer"]: r for r in _csv(copy / "results" / "results.csv")}
    assert rows["learned16"]["is_default"] == "True" and rows["learned8"]["mae_change_pct"]
    assert "no matrix.json" in p.stderr
