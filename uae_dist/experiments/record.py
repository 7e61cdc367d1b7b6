"""What a cell leaves in its directory besides the engine's run files.

``cell.json``  the runner's record: config hash, status (running | finished | failed |
               interrupted), exit code, log path, one entry per attempt (start, wall time, exit).
``cell.log``   stdout and stderr of every attempt, appended, one header line per attempt.
``metrics.json`` written once the engine has finished and tested: the cell is done when this file
               exists and holds the cell's config hash (and the data set's manifest sha256, when
               the data set is built).

Files are written to a temporary name and renamed, so a kill never leaves half a record.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

CELL, METRICS, LOG = "cell.json", "metrics.json", "cell.log"

UNITS = {"e_form_per_atom": "eV/atom", "atomization_energy_per_atom": "eV/atom",
         "band_gap": "eV", "gap_hse06": "eV", "gap_gga": "eV", "efermi": "eV"}


def write_json(path: Path, obj) -> None:
    path = Path(path)
    # unique per host and process: array tasks on several nodes may write the same file
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def is_done(cell_dir: Path, config_hash: str, manifest_sha: str | None) -> dict | None:
    """The cell's metrics when it is done for this config (and this data, if built), else None."""
    mt = read_json(Path(cell_dir) / METRICS)
    if not mt or mt.get("config_hash") != config_hash:
        return None
    if manifest_sha is not None and mt.get("data_manifest_sha256") != manifest_sha:
        return None
    return mt


def stale_hash(cell_dir: Path, config_hash: str) -> str | None:
    """The hash of another config recorded in ``cell_dir`` (its results are not this cell's)."""
    for name in (METRICS, CELL):
        rec = read_json(Path(cell_dir) / name)
        if rec and rec.get("config_hash") not in (None, config_hash):
            return rec["config_hash"]
    return None


def move_aside(cell_dir: Path, old_hash: str) -> Path:
    """Rename a cell directory of another config to ``<dir>.stale-<hash8>[-k]``; never delete."""
    base = Path(cell_dir)
    dest = base.with_name(f"{base.name}.stale-{old_hash[:8]}")
    k = 1
    while dest.exists():
        dest = base.with_name(f"{base.name}.stale-{old_hash[:8]}-{k}")
        k += 1
    shutil.move(str(base), str(dest))
    return dest


def start_attempt(cell_dir: Path, base: dict, command: list[str], pid: int) -> dict:
    rec = read_json(cell_dir / CELL) or {}
    attempts = rec.get("attempts", []) if rec.get("config_hash") == base["config_hash"] else []
    attempts.append({"start": time.strftime("%Y-%m-%dT%H:%M:%S"), "t0": time.time(),
                     "pid": pid, "exit_code": None})
    rec = {**base, "status": "running", "exit_code": None, "log": str(cell_dir / LOG),
           "command": command, "pid": pid, "attempts": attempts}
    write_json(cell_dir / CELL, rec)
    return rec


def end_attempt(cell_dir: Path, rec: dict, status: str, exit_code, error: str | None) -> dict:
    a = rec["attempts"][-1]
    a.update(exit_code=exit_code, status=status, wall_s=round(time.time() - a["t0"], 3))
    rec.update(status=status, exit_code=exit_code, error=error, pid=None)
    write_json(cell_dir / CELL, rec)
    return rec


def record_failure(cell_dir: Path, base: dict, exit_code, error: str) -> dict:
    """A cell that failed before any attempt (bad config, data set not buildable)."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    with open(cell_dir / LOG, "a") as fh:
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} not started: {error}\n")
    rec = {**(read_json(cell_dir / CELL) or {"attempts": []}), **base, "status": "failed",
           "exit_code": exit_code, "error": error, "log": str(cell_dir / LOG), "pid": None}
    write_json(cell_dir / CELL, rec)
    return rec


def collect(run_dir: Path, base: dict, target: str, units: str | None, attempts: list) -> dict:
    """``metrics.json`` of a finished cell, from the engine's files in ``run_dir``."""
    from uae_dist.train import checkpoint as ckpt

    run_dir = Path(run_dir)
    test = read_json(run_dir / "test_metrics.json")
    summary = read_json(run_dir / "summary.json")
    if not test or target not in test.get("targets", {}):
        raise RuntimeError(f"{run_dir}/test_metrics.json missing or without {target}")
    last = ckpt.latest(run_dir / "checkpoints")
    state = read_json(last / ckpt.STATE) if last else None
    if not state:
        raise RuntimeError(f"{run_dir}/checkpoints: no complete checkpoint")
    meta, cfg = state["meta"], state["config"]
    t = test["targets"][target]
    return {
        **base, "target": target, "units": units or UNITS.get(target),
        "test": {k: t[k] for k in ("mae", "rmse", "r2", "count", "mean_predictor_mae")},
        "test_all_targets": test["targets"], "test_checkpoint_step": test["step"],
        "steps": state["step"], "epochs": state["epoch"], "train_time_s": state["elapsed_s"],
        "wall_time_s": round(sum(a.get("wall_s") or 0.0 for a in attempts), 3),
        "attempts": len(attempts), "world_size": meta["world_size"],
        "n_train": meta["n_train"], "n_val": meta["n_val"], "n_test": meta["n_test"],
        "data_manifest_sha256": meta["data_manifest_sha256"],
        "model": cfg["model"]["name"], "model_features": cfg["model"].get("features"),
        "best_val": (summary or {}).get("best_val"),
        "predictions": "predictions_test.csv", "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
