"""Crystal structures → sharded LMDB graph records + manifest.json + split.json + rejects.jsonl.

``build_lmdb(source, out, **options)`` checks every option first (:mod:`.options`; nothing is
opened or created before), prepares ``out`` (refusing directories with files it did not write),
writes the shards (:mod:`.shard`, in worker processes (:mod:`.pool`) or MPI ranks) and gathers them
(:mod:`.finalize`). A build killed at any moment resumes (``resume=True``) with nothing missing and
nothing twice; a worker that dies fails the build with a message instead of hanging it.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from . import given_split, layout
from .finalize import finalize, make_split  # noqa: F401 - make_split: public here too
from .graph import SCHEMA_VERSION
from .layout import MANIFEST, REJECTS, SPLIT  # noqa: F401 - still importable from here
from .options import BuildError, BuildOptions, OptionError, RunOptions, make_options, validate
from .registry import resolve
from .shard import build_shard, open_source

log = logging.getLogger("uae_dist.data")

__all__ = ["build_lmdb", "BuildError", "OptionError", "BuildOptions", "RunOptions", "make_split"]


def mpi_world():
    """(comm, rank, size) when launched by mpirun/srun with MPI, else (None, 0, 1)."""
    # srun sets the step's task count; a batch script alone (one process) does not count as ranks
    slurm_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    launched = any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK",
                                             "MPI_LOCALNRANKS"))
    if not launched and not ("SLURM_PROCID" in os.environ and slurm_tasks > 1):
        return None, 0, 1
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1 and slurm_tasks > 1:
        # every task would build everything into the same shards
        raise BuildError(f"srun started {slurm_tasks} tasks but MPI sees one: use `srun "
                         "--mpi=pmix` (or pmi2) so the ranks find each other, or run a single "
                         "task with --workers")
    return comm, comm.Get_rank(), comm.Get_size()


def check_out_dir(out: Path) -> None:
    """``--out`` is a directory or can become one; OptionError otherwise (nothing is created)."""
    if out.exists() and not out.is_dir():
        raise OptionError("--out", f"{out} exists and is not a directory; give a directory path")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError("--out", f"{out}: {parent} is a file, so no directory can be made there")
    try:  # a real probe: os.access says yes to root on read-only or virtual file systems
        os.rmdir(tempfile.mkdtemp(prefix=".uae-probe-", dir=parent))
    except OSError as e:
        raise OptionError("--out", f"{out}: cannot create anything in {parent} ({e.strerror}); "
                                   "choose another --out") from None


# --------------------------------------------------------------------------- driver
def build_lmdb(source, out_dir, **options) -> dict:
    """Build the sharded LMDB of ``source`` in ``out_dir``; returns the manifest.

    ``options`` are the fields of :class:`BuildOptions` and :class:`RunOptions` (their defaults
    apply to what is not given or given as None). Raises OptionError (a BuildError) for a bad
    value before anything is opened, BuildError when the build cannot complete.
    """
    t0 = time.perf_counter()
    opts, run = make_options(**options)
    validate(opts, run)
    split_sha = None
    if opts.split_file is not None:  # checked before anything is opened, like every option
        opts.split_file = str(given_split.resolve(opts.split_file))
        split_sha = given_split.load(opts.split_file)[1]
    out = Path(out_dir)
    check_out_dir(out)
    comm, rank, size = mpi_world() if run.use_mpi else (None, 0, 1)
    path, known = resolve(str(source))
    if opts.targets is None and known is not None:
        opts.targets = list(known.targets)
    src = open_source(path, opts)
    opts.targets = list(src.target_names())
    opts.bounds = {k: v for k, v in opts.bounds.items() if k in opts.targets}
    identity = {"schema_version": SCHEMA_VERSION, "source_sha256": src.sha256(),
                "options": opts.identity()}
    if split_sha is not None:
        identity["split_file_sha256"] = split_sha
    if known is not None and identity["source_sha256"] != known.sha256:
        raise BuildError(f"{path}: sha256 {identity['source_sha256']} does not match the "
                         f"published {known.sha256} of {known.filename}; the file is damaged or "
                         "a different version")
    if comm is None or size == 1:
        return _build(src, path, known, out, opts, run, identity, None, 0, 1, t0)
    try:
        return _build(src, path, known, out, opts, run, identity, comm, rank, size, t0)
    except BaseException as e:  # one failed rank must not leave the others waiting forever
        print(f"uae-dist data build: rank {rank}: error: {e}", file=sys.stderr, flush=True)
        comm.Abort(2)
        raise


def _build(src, path, known, out, opts, run, identity, comm, rank, size, t0):
    if rank == 0:
        prepare_out(out, identity, run.resume, run.overwrite)
    if comm is not None:
        comm.Barrier()
    if (out / MANIFEST).exists():  # resume of a finished build
        return json.loads((out / MANIFEST).read_text())
    n = len(src) if opts.limit is None else min(opts.limit, len(src))
    if n == 0:
        raise BuildError(f"{path}: the source holds no records")
    first: dict[str, int] = {}
    dup_of: dict[int, int] = {}
    for k in range(n):
        rid = src.record(k).id
        if rid is None:  # rejected for its missing id; not a duplicate of anything
            continue
        if rid in first:
            dup_of[k] = first[rid]
        else:
            first[rid] = k
    jobs = [{"out": str(out), "source": str(path), "shard": s, "nshards": opts.shards, "n": n,
             "options": opts.identity(), "identity": identity, "dup_of": dup_of,
             "commit_every": run.commit_every}
            for s in range(opts.shards) if s % size == rank]
    log.info("rank %d/%d: building %d shard(s) of %d records from %s", rank, size, len(jobs), n,
             path)
    per_rank = sum(len(range(j["shard"], n, opts.shards)) for j in jobs)
    stats = _run_local(jobs, run.workers, per_rank, run.progress and rank == 0)
    if comm is not None:
        stats = sum(comm.allgather(stats), [])
        comm.Barrier()
    manifest = None
    if rank == 0:
        manifest = finalize(out, src, path, known, identity, opts, n, time.perf_counter() - t0,
                            run.workers * size)
        log.info("built %d records (%d rejected) in %.1f s", manifest["counts"]["records"],
                 manifest["counts"]["rejected"], manifest["build"]["wall_s"])
    if comm is not None:
        manifest = comm.bcast(manifest, root=0)
    return manifest


def _run_local(jobs: list, workers: int, total: int, show: bool) -> list:
    from tqdm import tqdm

    from .pool import run_pool
    bar = tqdm(total=total, desc="build", unit="rec", disable=not show, smoothing=0.05)
    try:
        if workers <= 1 or len(jobs) <= 1:  # in this process (an MPI rank may own no shard)
            def progress(kind, value):
                if kind == "done":
                    bar.update(value)
            return [build_shard(j, progress) for j in jobs]
        return run_pool(jobs, min(workers, len(jobs)), bar.update)
    finally:
        bar.close()


def prepare_out(out: Path, identity: dict, resume: bool, overwrite: bool) -> None:
    """Make ``out`` ready: refuse to mix builds; with ``overwrite`` delete what a build wrote there
    and nothing else (a directory holding other files is refused)."""
    ours, foreign = layout.classify(out)
    clash = [p for p in foreign if p.parent == out and p.name in layout.NAMES]
    if clash:  # a build would replace them
        raise BuildError(f"{out} holds {', '.join(p.name for p in clash)} that uae-dist did not "
                         "write; nothing was changed. Choose another --out")
    if overwrite and ours:
        if foreign:
            names = ", ".join(str(p.relative_to(out)) for p in foreign[:3])
            raise BuildError(f"--overwrite: {out} holds files uae-dist did not write ({names}"
                             f"{' …' if len(foreign) > 3 else ''}); nothing was deleted. Choose "
                             "another --out, or move those files away")
        for p in ours:
            p.unlink()
    sdir = out / layout.SHARD_DIR
    if (out / MANIFEST).exists():
        try:
            old = json.loads((out / MANIFEST).read_text())
        except ValueError:
            old = {}
        if resume and old.get("identity") == identity:
            return
        raise BuildError(f"{out} already holds a complete build"
                         + ("" if not resume else " with other options or another source")
                         + "; use --overwrite or another --out")
    if sdir.exists() and any(sdir.glob("*.lmdb")) and not resume:
        raise BuildError(f"{out} holds a partial build; pass --resume to finish it or "
                         "--overwrite to start again")
    if sdir.exists():
        n = identity["options"]["shards"]
        want = {layout.shard_name(s, n) for s in range(n)}
        extra = [p.name for p in sdir.glob("*.lmdb") if p.name not in want]
        if extra:
            raise BuildError(f"{sdir} has shards of a build with another shard count: "
                             f"{extra[:3]}; use --overwrite")
    try:
        sdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError("--out", f"cannot create {sdir}: {e.strerror}") from None

