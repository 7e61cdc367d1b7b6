"""``uae-dist matrix``: list, prepare and run the cells of an experiment matrix.

    uae-dist matrix list FILE                 # cells with index, status and the Slurm --array
    uae-dist matrix run FILE [--jobs N]       # every cell not yet done, N at a time
    uae-dist matrix run FILE --cell K         # exactly cell K (a Slurm array task)
    uae-dist matrix run FILE --dry-run        # what would run, and the commands
    uae-dist matrix prepare FILE              # build the data sets only

Exit codes of ``run``: 0 every selected cell is done; 1 some cell failed (the others still ran);
2 the matrix file or ``--cell`` is wrong; 75 stopped by a signal with checkpoints written (run
it again to resume).
"""
from __future__ import annotations

import logging
import shlex
import shutil
import time
from pathlib import Path

from . import datasets as DS
from . import record
from .cells import Resolved, expand, resolve_all
from .runner import Outcome, Runner, command
from .schema import Matrix

log = logging.getLogger("uae_dist.matrix")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 75
INDEX = "matrix.json"


def plan(m: Matrix) -> list[Resolved]:
    """Every cell, resolved (configs loaded and hashed; bad ones carry their error)."""
    return resolve_all(m, expand(m))


def base_record(m: Matrix, r: Resolved) -> dict:
    """The identity fields every ``cell.json`` and ``metrics.json`` of the cell starts with."""
    c = r.cell
    return {"matrix": m.name, "index": c.index, "cell": c.name, "backbone": c.backbone,
            "featurizer": c.featurizer,
            "default_featurizer": m.backbones[c.backbone].default_featurizer,
            "task": c.task, "dataset": c.dataset, "target": c.target, "seed": c.seed,
            "config_hash": r.hash}


def _shas(m: Matrix) -> dict:
    return {n: DS.manifest_sha256(d.root) for n, d in m.datasets.items()}


def status(r: Resolved, shas: dict) -> str:
    """invalid | done | running (in some runner) | stale | failed | partial (resumes from a
    checkpoint) | todo."""
    if r.error:
        return "invalid"
    if record.is_done(r.dir, r.hash, shas.get(r.cell.dataset)):
        return "done"
    if _locked(r.dir / ".lock"):
        return "running"
    if record.stale_hash(r.dir, r.hash):
        return "stale"
    if (r.dir / "checkpoints" / "latest").exists():
        return "partial"
    rec = record.read_json(r.dir / record.CELL) or {}
    return "failed" if rec.get("status") == "failed" else "todo"


def _locked(path: Path) -> bool:
    import fcntl

    if not path.exists():
        return False
    with open(path) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def write_index(m: Matrix, resolved: list[Resolved]) -> Path:
    """``<out_root>/matrix.json``: every cell and the default featurizers (``uae-dist results``)."""
    m.out_root.mkdir(parents=True, exist_ok=True)
    idx = {
        "name": m.name, "file": str(m.path.resolve()), "file_sha256": m.sha256,
        "n_cells": len(resolved), "seeds": list(m.seeds),
        "backbones": {b.name: {"config": b.config, "default_featurizer": b.default_featurizer,
                               "featurizers": list(b.featurizers), "tasks": list(b.tasks)}
                      for b in m.backbones.values()},
        "tasks": {t.name: {"dataset": t.dataset, "target": t.target,
                           "units": t.units or record.UNITS.get(t.target)}
                  for t in m.tasks.values()},
        "cells": [{**base_record(m, r), "dir": str(r.cell.dir(m).relative_to(m.out_root)),
                   "error": r.error} for r in resolved],
    }
    record.write_json(m.out_root / INDEX, idx)
    return m.out_root / INDEX


def format_list(m: Matrix, resolved: list[Resolved], commands: bool = False,
                launcher: tuple = ()) -> str:
    shas = _shas(m)
    rows = [f"{'K':>4}  {'status':<8} cell"]
    counts: dict = {}
    for r in resolved:
        st = status(r, shas)
        counts[st] = counts.get(st, 0) + 1
        rows.append(f"{r.cell.index:>4}  {st:<8} {r.cell.name}"
                    + (f"   {r.error}" if r.error else ""))
        if commands and not r.error:
            rows.append("        " + shlex.join(command(r, launcher)))
    n = len(resolved)
    rows.append(f"{n} cells ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}) → "
                f"{m.out_root}")
    rows.append(f"Slurm: sbatch --array=0-{n - 1} … uae-dist matrix run {m.path} "
                "--cell $SLURM_ARRAY_TASK_ID")
    return "\n".join(rows)


def prepare(m: Matrix, names=None, workers: int = 1) -> list[tuple[str, str]]:
    """Build the named data sets (all by default) that are missing; returns (name, error) of
    those that could not be built."""
    bad = []
    for ds in DS.needed(m, names if names is not None else m.datasets):
        try:
            DS.ensure(ds, workers)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            log.error("data set %s: %s", ds.name, e)
            bad.append((ds.name, str(e)))
    return bad


def select(resolved: list[Resolved], cell: int | None) -> list[Resolved]:
    if cell is None:
        return resolved
    if not 0 <= cell < len(resolved):
        raise IndexError(f"--cell {cell}: the matrix has cells 0 to {len(resolved) - 1}")
    return [resolved[cell]]


def run(m: Matrix, cell: int | None = None, jobs: int | None = None,
        launcher: tuple | None = None) -> int:
    """Run the selected cells (all, or ``cell``) not yet done; see the module docstring."""
    t0 = time.time()
    resolved = plan(m)
    chosen = select(resolved, cell)
    write_index(m, resolved)
    jobs = 1 if cell is not None else (jobs or m.run.jobs)
    shas = _shas(m)
    outcomes: list[Outcome] = []
    todo = []
    for r in chosen:
        base = base_record(m, r)
        if r.error:
            record.record_failure(r.dir, base, 2, r.error)
            outcomes.append(Outcome("failed", r, 2, r.error))
            log.error("FAILED [%d] %s  %s", r.cell.index, r.cell.name, r.error)
            continue
        mt = record.is_done(r.dir, r.hash, shas.get(r.cell.dataset))
        if mt is None and not _locked(r.dir / ".lock"):
            mt = _reuse(m, r, shas.get(r.cell.dataset))
        if mt:
            outcomes.append(Outcome("skipped", r, 0, metrics=mt))
            continue
        if _locked(r.dir / ".lock"):  # never move or start a cell another runner is training
            pid = (record.read_json(r.dir / record.CELL) or {}).get("pid")
            outcomes.append(Outcome("busy", r, error=f"another process (pid {pid}) runs it"))
            log.warning("busy   [%d] %s: another process (pid %s) runs it", r.cell.index,
                        r.cell.name, pid)
            continue
        old = record.stale_hash(r.dir, r.hash)
        if old:
            dest = record.move_aside(r.dir, old)
            log.warning("[%d] %s: results of another config (hash %s…) moved to %s",
                        r.cell.index, r.cell.name, old[:12], dest)
        todo.append((r, base, m.tasks[r.cell.task].units))
    skipped = sum(o.status == "skipped" for o in outcomes)
    log.info("matrix %s: %d cell(s) selected, %d done already, %d to run, %d at a time → %s",
             m.name, len(chosen), skipped, len(todo), jobs, m.out_root)
    broken = dict(prepare(m, {r.cell.dataset for r, _, _ in todo}, workers=jobs))
    for r, base, _ in [t for t in todo if t[0].cell.dataset in broken]:
        err = f"data set {r.cell.dataset}: {broken[r.cell.dataset]}"
        record.record_failure(r.dir, base, 2, err)
        outcomes.append(Outcome("failed", r, 2, err))
    todo = [t for t in todo if t[0].cell.dataset not in broken]
    runner = Runner(todo, jobs, m.run.threads, m.run.launcher if launcher is None else launcher,
                    m.run.timeout_s, m.run.env)
    outcomes += runner.run()
    return _report(m, outcomes, time.time() - t0)


def _reuse(m: Matrix, r: Resolved, manifest_sha: str | None) -> dict | None:
    """Copy the same cell, done with the same config hash on the same data, from a matrix named
    in ``reuse:`` (the same experiment: re-running it would only re-measure the seed's noise)."""
    rel = r.dir.relative_to(m.out_root.resolve())
    for root in m.reuse:
        src = root / rel
        if record.is_done(src, r.hash, manifest_sha) and not _locked(src / ".lock"):
            old = record.stale_hash(r.dir, r.hash)
            if old:
                record.move_aside(r.dir, old)
            shutil.copytree(src, r.dir, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".lock"))
            log.info("reused [%d] %s from %s", r.cell.index, r.cell.name, src)
            return record.is_done(r.dir, r.hash, manifest_sha)
    return None


def _report(m: Matrix, outcomes: list[Outcome], wall: float) -> int:
    by = {}
    for o in outcomes:
        by.setdefault(o.status, []).append(o)
    parts = [f"{len(by[k])} {k}" for k in ("done", "skipped", "failed", "interrupted", "busy")
             if k in by]
    log.info("matrix %s: %s in %s", m.name, ", ".join(parts) or "nothing to do", _hms(wall))
    for o in by.get("failed", []):
        log.error("  failed [%d] %s: exit %s, %s; log %s", o.resolved.cell.index,
                  o.resolved.cell.name, o.exit_code, o.error, o.log)
    if by.get("failed"):
        return EXIT_FAILED
    if by.get("interrupted") or by.get("busy"):
        return EXIT_INTERRUPTED
    return EXIT_OK


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else \
        f"{s // 60}m{s % 60:02d}s"
