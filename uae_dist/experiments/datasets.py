"""The data sets of a matrix: built once, under a lock, before the cells that read them.

Several runners may start at once (parallel cells of one machine, the tasks of a Slurm array):
each takes an exclusive ``flock`` on ``<parent>/.<root name>.build.lock`` before looking for
``manifest.json``; the first one builds (``resume=True``: a killed build is finished, not
restarted), the others wait and then find it built. ``flock`` needs a filesystem that supports
it (local disks, NFSv4, Lustre and GPFS mounted with locking); elsewhere build the data sets
first with ``uae-dist matrix prepare FILE``.
"""
from __future__ import annotations

import fcntl
import logging
import time
from pathlib import Path

from .schema import Dataset, Matrix

log = logging.getLogger("uae_dist.matrix")


def manifest_sha256(root) -> str | None:
    """sha256 of ``root/manifest.json`` (what the engine records for a run), None if unbuilt."""
    import hashlib

    p = Path(root) / "manifest.json"
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None


def lock_path(root) -> Path:
    root = Path(root).resolve()
    return root.parent / f".{root.name}.build.lock"


def ensure(ds: Dataset, workers: int = 1) -> str:
    """Build ``ds`` if its manifest is missing; returns the manifest sha256. Raises
    ``FileNotFoundError``/``ValueError``/``RuntimeError`` with the reason when it cannot."""
    root = Path(ds.root).resolve()
    if (root / "manifest.json").exists():
        return manifest_sha256(root)
    if ds.build is None:
        raise FileNotFoundError(f"data set {ds.name!r}: {root}/manifest.json not found and no "
                                "build: options given (uae-dist data build --out …)")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(root), "a+") as fh:
        t0 = time.time()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("data set %s: another process is building %s; waiting", ds.name, root)
            fcntl.flock(fh, fcntl.LOCK_EX)
            log.info("data set %s: lock released after %.0f s", ds.name, time.time() - t0)
        if not (root / "manifest.json").exists():
            _build(ds, root, workers)
    return manifest_sha256(root)


def _build(ds: Dataset, root: Path, workers: int) -> None:
    from uae_dist.data.build import build_lmdb

    kw = dict(ds.build)
    source = kw.pop("source")
    kw.setdefault("workers", max(1, workers))
    kw["use_mpi"] = False  # one builder process, even inside a Slurm step
    for k in ("split",):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    log.info("data set %s: building %s from %s (%s)", ds.name, root, source,
             ", ".join(f"{k}={v}" for k, v in kw.items()))
    t0 = time.time()
    m = build_lmdb(source, root, resume=True, progress=False, **kw)
    c = m["counts"]
    log.info("data set %s: %d records (%d rejected) in %.0f s", ds.name, c["records"],
             c["rejected"], time.time() - t0)


def needed(m: Matrix, names) -> list[Dataset]:
    """The data sets named in ``names``, in the matrix's order, once each."""
    want = set(names)
    return [d for n, d in m.datasets.items() if n in want]
