"""``uae-dist results RUNS_DIR``: a matrix's cells gathered into one table, plots beside it.

For each task × backbone × featurizer: the number of seeds done, test MAE, RMSE and R² as mean ±
sample standard deviation over the seeds (``ddof=1``; no std from one seed), and the % change of
the mean MAE against the backbone's default featurizer on the same task,
``100 · (MAE_f − MAE_default) / MAE_default`` (negative: lower error than the default). Written
to ``results.md``, ``results.csv`` (one row per group) and ``cells.csv`` (one row per cell), with
parity plots and learning curves (``plots.py``). Cells are those of ``RUNS_DIR/matrix.json``
(written by ``uae-dist matrix run``), so missing and failed cells are named; without it, every
``metrics.json`` below ``RUNS_DIR`` is used and only failures recorded in ``cell.json`` are known.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import record

INDEX = "matrix.json"
METRICS = ("mae", "rmse", "r2")


@dataclass
class Report:
    rows: list                     # one dict per task × backbone × featurizer
    cells: list                    # one dict per cell (with its status)
    markdown: str = ""
    files: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    notes: list = field(default_factory=list)


# --------------------------------------------------------------------------- reading
def load_cells(runs_dir) -> tuple[dict | None, list[dict]]:
    """(index or None, cells): each cell a dict of its identity, ``status`` (done | failed |
    missing), ``dir``, and ``metrics`` when done."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    index = record.read_json(root / INDEX)
    out = []
    if index:
        for c in index["cells"]:
            d = root / c["dir"]
            mt = record.read_json(d / record.METRICS)
            rec = record.read_json(d / record.CELL) or {}
            if mt and mt.get("config_hash") == c["config_hash"] and c["config_hash"]:
                out.append({**c, "dir": d, "status": "done", "metrics": mt})
            elif c.get("error") or (rec.get("status") == "failed"
                                    and rec.get("config_hash") == c["config_hash"]):
                out.append({**c, "dir": d, "status": "failed",
                            "error": c.get("error") or rec.get("error"),
                            "exit_code": rec.get("exit_code", 2), "log": rec.get("log")})
            else:
                out.append({**c, "dir": d, "status": "missing", "state": rec.get("status")})
        return index, out
    for p in sorted(root.rglob(record.METRICS)):
        if ".stale-" in str(p.parent):
            continue
        mt = record.read_json(p)
        if mt and "test" in mt:
            out.append({**{k: mt.get(k) for k in ("index", "cell", "backbone", "featurizer",
                                                  "default_featurizer", "task", "dataset",
                                                  "target", "seed", "config_hash")},
                        "dir": p.parent, "status": "done", "metrics": mt})
    for p in sorted(root.rglob(record.CELL)):
        rec = record.read_json(p)
        if rec and rec.get("status") == "failed" and not (p.parent / record.METRICS).exists():
            out.append({**rec, "dir": p.parent, "status": "failed"})
    if not out:
        raise FileNotFoundError(f"no {INDEX} and no {record.METRICS} below {root}")
    return None, out


# --------------------------------------------------------------------------- numbers
def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1) of the non-None values; std is None for fewer than two."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def pct_change(value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None or ref == 0:
        return None
    return 100.0 * (value - ref) / ref


def summarize(index: dict | None, cells: list[dict]) -> list[dict]:
    """One row per task × backbone × featurizer, in the matrix's order (see module docstring)."""
    groups: dict = {}
    for c in cells:
        groups.setdefault((c["task"], c["backbone"], c["featurizer"]), []).append(c)
    rows = []
    for (task, bb, fz), cs in groups.items():
        done = [c for c in cs if c["status"] == "done"]
        default = _default(index, cs)
        row = {"task": task, "dataset": cs[0].get("dataset"), "target": cs[0].get("target"),
               "units": _units(index, task, done), "backbone": bb, "featurizer": fz,
               "default_featurizer": default, "is_default": fz == default,
               "n_done": len(done), "n_cells": len(cs),
               "n_failed": sum(c["status"] == "failed" for c in cs),
               "seeds": " ".join(str(c["seed"]) for c in sorted(done, key=lambda c: c["seed"]))}
        for k in METRICS:
            row[f"{k}_mean"], row[f"{k}_std"] = mean_std([c["metrics"]["test"][k] for c in done])
        row["train_time_s_mean"], _ = mean_std([c["metrics"]["train_time_s"] for c in done])
        rows.append(row)
    ref = {(r["task"], r["backbone"]): r["mae_mean"] for r in rows if r["is_default"]}
    for r in rows:
        r["mae_change_pct"] = None if r["is_default"] else \
            pct_change(r["mae_mean"], ref.get((r["task"], r["backbone"])))
    return _order(index, rows)


def _default(index, cs) -> str | None:
    bb = cs[0]["backbone"]
    if index and bb in index.get("backbones", {}):
        return index["backbones"][bb]["default_featurizer"]
    return next((c.get("default_featurizer") for c in cs if c.get("default_featurizer")), None)


def _units(index, task, done) -> str | None:
    if index and task in index.get("tasks", {}):
        return index["tasks"][task].get("units")
    return next((c["metrics"].get("units") for c in done), None)


def _order(index, rows):
    if not index:
        return sorted(rows, key=lambda r: (str(r["task"]), str(r["backbone"]),
                                           not r["is_default"], str(r["featurizer"])))
    tasks = list(index["tasks"])
    bbs = index["backbones"]

    def key(r):
        fz = bbs[r["backbone"]]["featurizers"]
        return (tasks.index(r["task"]), list(bbs).index(r["backbone"]), fz.index(r["featurizer"]))
    return sorted(rows, key=key)


# --------------------------------------------------------------------------- writing
def _pm(mean, std, digits: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _pct(v) -> str:
    return "–" if v is None else f"{v:+.1f} %"


def markdown(rows: list[dict], cells: list[dict], title: str) -> str:
    out = [f"# {title}", "",
           "Test set; mean ± sample std over seeds; ΔMAE: change of the mean MAE against the "
           "backbone's default featurizer on the same task.", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        u = rs[0]["units"] or "units of the target"
        out += [f"## {task}: {rs[0]['target']} on {rs[0]['dataset']} (MAE, RMSE in {u})", "",
                "| backbone | featurizer | seeds | MAE | RMSE | R² | ΔMAE vs default | "
                "train time (s) |", "|---|---|---|---|---|---|---|---|"]
        for r in rs:
            fz = r["featurizer"] + (" (default)" if r["is_default"] else "")
            seeds = f"{r['n_done']}/{r['n_cells']}"
            t = "–" if r["train_time_s_mean"] is None else f"{r['train_time_s_mean']:.0f}"
            out.append(f"| {r['backbone']} | {fz} | {seeds} | {_pm(r['mae_mean'], r['mae_std'], 4)}"
                       f" | {_pm(r['rmse_mean'], r['rmse_std'], 4)} | "
                       f"{_pm(r['r2_mean'], r['r2_std'], 3)} | {_pct(r['mae_change_pct'])} | {t} |")
        out.append("")
    bad = [c for c in cells if c["status"] != "done"]
    if bad:
        out += ["## Cells without results", ""]
        for c in sorted(bad, key=lambda c: (c.get("index") is None, c.get("index") or 0)):
            if c["status"] == "failed":
                out.append(f"- failed: [{c.get('index')}] {c.get('cell')}: exit "
                           f"{c.get('exit_code')}, {c.get('error')} (log {c.get('log')})")
            else:
                st = c.get("state") or "not run"
                out.append(f"- missing: [{c.get('index')}] {c.get('cell')} ({st})")
        out.append("")
    return "\n".join(out)


def _csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v))
                            else repr(v) if isinstance(v, float) else v) for k, v in r.items()})


ROW_FIELDS = ["task", "dataset", "target", "units", "backbone", "featurizer", "is_default",
              "default_featurizer", "n_done", "n_cells", "n_failed", "seeds", "mae_mean",
              "mae_std", "rmse_mean", "rmse_std", "r2_mean", "r2_std", "mae_change_pct",
              "train_time_s_mean"]
CELL_FIELDS = ["index", "cell", "task", "backbone", "featurizer", "seed", "status", "mae",
               "rmse", "r2", "n_test", "train_time_s", "wall_time_s", "config_hash", "dir"]


def _cell_rows(cells):
    for c in cells:
        mt = c.get("metrics") or {}
        t = mt.get("test", {})
        yield {**{k: c.get(k) for k in CELL_FIELDS}, "mae": t.get("mae"), "rmse": t.get("rmse"),
               "r2": t.get("r2"), "n_test": t.get("count"), "train_time_s": mt.get("train_time_s"),
               "wall_time_s": mt.get("wall_time_s"), "dir": str(c["dir"])}


def gather_and_write(runs_dir, out=None, plots: bool = True) -> Report:
    """Read the cells of ``runs_dir``, write the tables (and plots) to ``out``."""
    index, cells = load_cells(runs_dir)
    rows = summarize(index, cells)
    out = Path(out) if out else Path(runs_dir) / "results"
    out.mkdir(parents=True, exist_ok=True)
    title = f"Matrix {index['name']}" if index else f"Results of {runs_dir}"
    rep = Report(rows, cells, markdown(rows, cells, title))
    rep.missing = [c for c in cells if c["status"] == "missing"]
    rep.failed = [c for c in cells if c["status"] == "failed"]
    (out / "results.md").write_text(rep.markdown)
    _csv(out / "results.csv", rows, ROW_FIELDS)
    _csv(out / "cells.csv", list(_cell_rows(cells)), CELL_FIELDS)
    rep.files += [out / "results.md", out / "results.csv", out / "cells.csv"]
    if plots:
        from .plots import learning_curves, parity_plots

        rep.files += parity_plots(rows, cells, out) + learning_curves(rows, cells, out)
    done = sum(c["status"] == "done" for c in cells)
    rep.notes.append(f"{done} of {len(cells)} cells done, {len(rep.failed)} failed, "
                     f"{len(rep.missing)} missing")
    if index is None:
        rep.notes.append(f"no {INDEX} in {runs_dir}: cells never started are not known")
    return rep
