"""Handlers of ``uae-dist matrix …`` and ``uae-dist results`` (``uae_dist/cli.py`` parses the
arguments and calls these). Heavy imports stay inside the functions."""
from __future__ import annotations

import json
import shlex
import sys


def _load(a):
    from .schema import MatrixError, load_matrix

    try:
        return load_matrix(a.file, out_root=getattr(a, "out_root", None))
    except MatrixError as e:
        print(f"uae-dist matrix: error: {e}", file=sys.stderr)
        return None


def matrix_list(a) -> int:
    from . import matrix as M

    m = _load(a)
    if m is None:
        return M.EXIT_USAGE
    resolved = M.plan(m)
    if a.count:
        print(len(resolved))
    elif a.json:
        shas = M._shas(m)
        print(json.dumps([{**M.base_record(m, r), "dir": str(r.dir), "status": M.status(r, shas),
                           "error": r.error} for r in resolved], indent=1))
    else:
        print(M.format_list(m, resolved, commands=a.commands))
    return M.EXIT_OK


def matrix_run(a) -> int:
    from . import matrix as M

    m = _load(a)
    if m is None:
        return M.EXIT_USAGE
    launcher = tuple(shlex.split(a.launcher)) if a.launcher is not None else None
    if a.list or a.dry_run:
        resolved = M.plan(m)
        try:
            chosen = M.select(resolved, a.cell)
        except IndexError as e:
            print(f"uae-dist matrix: error: {e}", file=sys.stderr)
            return M.EXIT_USAGE
        print(M.format_list(m, chosen, commands=a.dry_run,
                            launcher=m.run.launcher if launcher is None else launcher))
        return M.EXIT_OK
    try:
        return M.run(m, cell=a.cell, jobs=a.jobs, launcher=launcher)
    except IndexError as e:
        print(f"uae-dist matrix: error: {e}", file=sys.stderr)
        return M.EXIT_USAGE


def matrix_prepare(a) -> int:
    from . import matrix as M

    m = _load(a)
    if m is None:
        return M.EXIT_USAGE
    bad = M.prepare(m, workers=a.workers)
    return M.EXIT_FAILED if bad else M.EXIT_OK


def results(a) -> int:
    from .results import gather_and_write

    try:
        rep = gather_and_write(a.runs_dir, out=a.out, plots=not a.no_plots)
    except FileNotFoundError as e:
        print(f"uae-dist results: error: {e}", file=sys.stderr)
        return 2
    print(rep.markdown)
    for line in rep.notes:
        print(line, file=sys.stderr)
    print(f"→ {', '.join(str(p) for p in rep.files)}", file=sys.stderr)
    return 1 if a.strict and (rep.missing or rep.failed) else 0
