"""Crystal structures → sharded LMDB graph records + manifest.json + split.json + rejects.jsonl.

Each shard is written by exactly one process (a worker of a local pool or an MPI rank), committing
every ``commit_every`` records together with their summaries and rejects, so a build killed at any
moment resumes (``resume=True``) with nothing missing and nothing twice. The manifest is written
last and atomically: its presence means the build is complete.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import lmdb_store as store
from .graph import SCHEMA_VERSION, GraphOptions, RejectError, build_graph, check_labels, encode_record, validate_crystal
from .registry import DEFAULT_BOUNDS, resolve

log = logging.getLogger("uae_dist.data")

MANIFEST = "manifest.json"
SPLIT = "split.json"
REJECTS = "rejects.jsonl"


@dataclass
class BuildOptions:
    cutoff: float = 8.0
    max_neighbors: int | None = None
    targets: list[str] | None = None
    bounds: dict = field(default_factory=dict)
    shards: int = 1
    limit: int | None = None
    fmt: str = "auto"
    id_key: str | None = None
    cif_key: str = "cif"
    fast_cif: bool = True
    split: tuple = (0.8, 0.1, 0.1)
    seed: int = 0

    def identity(self) -> dict:
        """What must not change between a partial build and its resumption."""
        d = asdict(self)
        d["bounds"] = {k: list(v) for k, v in sorted(self.bounds.items())}
        d["split"] = list(self.split)
        return d


class BuildError(RuntimeError):
    pass


def _neighbor_fn():
    try:  # compiled op when available (issue 3), identical output to the reference
        from uae_dist.ops import neighbor_list_np
        return neighbor_list_np
    except ImportError:
        from uae_dist.ops import neighbor_list_numpy
        return neighbor_list_numpy


def _open_source(path, opts: BuildOptions):
    from .sources import open_source
    return open_source(path, fmt=opts.fmt, id_key=opts.id_key, cif_key=opts.cif_key,
                       targets=opts.targets, fast_cif=opts.fast_cif)


# --------------------------------------------------------------------------- one shard
def _process_one(src, k: int, dup_of: dict, opts: BuildOptions, gopts: GraphOptions, nfn):
    """→ ('r', blob, summary) or ('x', reject)."""
    rec_id = None
    try:
        rec = src.record(k)
        rec_id = rec.id
        if k in dup_of:
            raise RejectError("duplicate_id", f"id {rec.id!r} already used by source record {dup_of[k]}")
        names = src.target_names()
        y = np.array([rec.targets.get(t, math.nan) for t in names], dtype=np.float64)
        check_labels(dict(zip(names, y.tolist())), opts.bounds)
        try:
            c = src.parse(rec)
        except ValueError as e:  # ParseError and friends
            raise RejectError("parse_error", str(e)) from None
        validate_crystal(c.numbers, c.lattice, c.frac, c.pbc)
        g = build_graph(c.numbers, c.lattice, c.frac, c.pbc, gopts, nfn)
        blob = encode_record(rec.id, g, y)
        zs, cnt = np.unique(g["z"], return_counts=True)
        summary = {"id": rec.id, "natoms": int(len(g["z"])), "nedges": int(len(g["j"])),
                   "y": [None if not np.isfinite(v) else float(v) for v in y],
                   "elements": {str(int(a)): int(b) for a, b in zip(zs, cnt)}}
        return "r", blob, summary
    except RejectError as e:
        return "x", {"index": k, "id": rec_id, "reason": e.reason, "detail": e.detail}
    except Exception as e:  # one bad structure never kills the build
        detail = f"{type(e).__name__}: {e} | {traceback.format_exc(limit=2).splitlines()[-1]}"
        return "x", {"index": k, "id": rec_id, "reason": "internal_error", "detail": detail}


def build_shard(job: dict) -> dict:
    """Write (or finish) one shard. Runs in a worker process or an MPI rank."""
    out, shard, nshards = Path(job["out"]), job["shard"], job["nshards"]
    opts = BuildOptions(**{**job["options"], "split": tuple(job["options"]["split"])})
    gopts = GraphOptions(opts.cutoff, opts.max_neighbors)
    src = _open_source(job["source"], opts)
    nfn = _neighbor_fn()
    dup_of = {int(k): v for k, v in job["dup_of"].items()}
    path = out / store.SHARD_DIR / store.shard_name(shard, nshards)
    env = store.open_writer(path)
    progress = job.get("progress")
    try:
        with env.begin(write=True) as txn:
            meta = store.get_json(txn, b"__meta__")
            if meta is None:
                store.put_json(txn, b"__meta__", job["identity"] | {"shard": shard, "of": nshards})
            elif {k: v for k, v in meta.items() if k not in ("shard", "of")} != job["identity"]:
                raise BuildError(f"{path}: written by a build with other options or another source; "
                                 "use a new --out or --overwrite")
        with env.begin() as txn:
            done = {int(k[1:]) for k, _ in store.iter_prefix(txn, b"s")}
            done |= {int(k[1:]) for k, _ in store.iter_prefix(txn, b"x")}
        todo = [k for k in range(shard, job["n"], nshards) if k not in done]
        n_ok = n_bad = 0
        for c0 in range(0, len(todo), job["commit_every"]):
            chunk = todo[c0:c0 + job["commit_every"]]
            results = [(k, _process_one(src, k, dup_of, opts, gopts, nfn)) for k in chunk]
            with env.begin(write=True) as txn:
                for k, res in results:
                    if res[0] == "r":
                        txn.put(store.rkey("r", k), res[1])
                        store.put_json(txn, store.rkey("s", k), res[2])
                        n_ok += 1
                    else:
                        store.put_json(txn, store.rkey("x", k), res[1])
                        n_bad += 1
            if progress is not None:
                progress.put(len(chunk))
    finally:
        env.close()
    return {"shard": shard, "written": n_ok, "rejected": n_bad, "skipped": len(done)}


# --------------------------------------------------------------------------- workers
_PROGRESS = None


def _init_worker(queue):
    global _PROGRESS
    _PROGRESS = queue
    try:  # Linux: die with the parent, so a killed build leaves no writer behind to race its --resume
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def _pool_job(job):
    return build_shard({**job, "progress": _PROGRESS})


def _run_local(jobs: list, workers: int, total: int, show: bool) -> list:
    from tqdm import tqdm
    bar = tqdm(total=total, desc="build", unit="rec", disable=not show, smoothing=0.05)
    if workers <= 1 or len(jobs) <= 1:  # an MPI rank may own no shard at all
        class _Q:
            def put(self, n):
                bar.update(n)
        stats = [build_shard({**j, "progress": _Q()}) for j in jobs]
        bar.close()
        return stats
    import multiprocessing as mp
    import queue as _queue
    ctx = mp.get_context("spawn")  # no fork: the parent may hold OpenMP threads or lmdb handles
    q = ctx.Queue()
    with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(q,)) as pool:
        res = pool.map_async(_pool_job, jobs, chunksize=1)
        while not res.ready():
            try:
                bar.update(q.get(timeout=0.2))
            except _queue.Empty:
                pass
        stats = res.get()
        while True:
            try:
                bar.update(q.get_nowait())
            except _queue.Empty:
                break
    bar.close()
    return stats


def mpi_world():
    """(comm, rank, size) when launched by mpirun/srun with MPI, else (None, 0, 1)."""
    # srun sets the step's task count; a batch script alone (one process) does not count as ranks
    slurm_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    launched = any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))
    if not launched and not ("SLURM_PROCID" in os.environ and slurm_tasks > 1):
        return None, 0, 1
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1 and slurm_tasks > 1:
        # every task would build everything into the same shards
        raise BuildError(f"srun started {slurm_tasks} tasks but MPI sees one: use `srun --mpi=pmix` "
                         "(or pmi2) so the ranks find each other, or run a single task with --workers")
    return comm, comm.Get_rank(), comm.Get_size()


# --------------------------------------------------------------------------- driver
def build_lmdb(source, out_dir, *, targets=None, cutoff=8.0, max_neighbors=None, shards=1, workers=1,
               limit=None, resume=False, overwrite=False, bounds=None, fmt="auto", id_key=None, cif_key="cif",
               fast_cif=True, split=(0.8, 0.1, 0.1), seed=0, commit_every=128, progress=True, use_mpi=True) -> dict:
    """Build the sharded LMDB of ``source`` in ``out_dir``; returns the manifest."""
    t0 = time.perf_counter()
    comm, rank, size = mpi_world() if use_mpi else (None, 0, 1)
    path, known = resolve(str(source))
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t]
    if targets is None and known is not None:
        targets = list(known.targets)
    if bounds is None:
        bounds = dict(DEFAULT_BOUNDS)
    if shards < 1 or (max_neighbors is not None and max_neighbors < 1) or cutoff <= 0:
        raise BuildError("shards and max_neighbors must be >= 1 and cutoff > 0")
    opts = BuildOptions(cutoff=float(cutoff), max_neighbors=max_neighbors, targets=targets,
                        bounds={k: tuple(map(float, v)) for k, v in bounds.items()}, shards=shards, limit=limit,
                        fmt=fmt, id_key=id_key, cif_key=cif_key, fast_cif=fast_cif, split=tuple(split), seed=seed)
    out = Path(out_dir)
    src = _open_source(path, opts)
    opts.targets = list(src.target_names())
    opts.bounds = {k: v for k, v in opts.bounds.items() if k in opts.targets}
    identity = {"schema_version": SCHEMA_VERSION, "source_sha256": src.sha256(), "options": opts.identity()}
    if known is not None and identity["source_sha256"] != known.sha256:
        raise BuildError(f"{path}: sha256 {identity['source_sha256']} does not match the published "
                         f"{known.sha256} of {known.filename}; the file is damaged or a different version")

    if comm is None or size == 1:
        return _build(src, path, known, out, opts, identity, resume, overwrite, workers, commit_every, progress,
                      None, 0, 1, t0)
    try:
        return _build(src, path, known, out, opts, identity, resume, overwrite, workers, commit_every, progress,
                      comm, rank, size, t0)
    except BaseException as e:  # one failed rank must not leave the others waiting forever
        print(f"uae-dist data build: rank {rank}: error: {e}", file=sys.stderr, flush=True)
        comm.Abort(2)
        raise


def _build(src, path, known, out, opts, identity, resume, overwrite, workers, commit_every, progress,
           comm, rank, size, t0):
    shards, limit = opts.shards, opts.limit
    if rank == 0:
        _prepare_out(out, identity, resume, overwrite)
    if comm is not None:
        comm.Barrier()
    if (out / MANIFEST).exists():  # resume of a finished build
        return json.loads((out / MANIFEST).read_text())

    n = len(src) if limit is None else min(limit, len(src))
    if n == 0:
        raise BuildError(f"{path}: the source holds no records")
    first: dict[str, int] = {}
    dup_of: dict[int, int] = {}
    for k in range(n):
        rid = src.record(k).id
        if rid in first:
            dup_of[k] = first[rid]
        else:
            first[rid] = k
    jobs = [{"out": str(out), "source": str(path), "shard": s, "nshards": shards, "n": n,
             "options": asdict(opts), "identity": identity, "dup_of": dup_of, "commit_every": commit_every}
            for s in range(shards) if s % size == rank]
    log.info("rank %d/%d: building %d shard(s) of %d records from %s", rank, size, len(jobs), n, path)
    show = progress and rank == 0
    per_rank = sum(len(range(j["shard"], n, shards)) for j in jobs)
    stats = _run_local(jobs, workers, per_rank, show)
    if comm is not None:
        stats = sum(comm.allgather(stats), [])
        comm.Barrier()
    manifest = None
    if rank == 0:
        manifest = finalize(out, src, path, known, identity, opts, n, time.perf_counter() - t0, workers * size)
        log.info("built %d records (%d rejected) in %.1f s", manifest["counts"]["records"],
                 manifest["counts"]["rejected"], manifest["build"]["wall_s"])
    if comm is not None:
        manifest = comm.bcast(manifest, root=0)
    return manifest


def _prepare_out(out: Path, identity: dict, resume: bool, overwrite: bool) -> None:
    sdir = out / store.SHARD_DIR
    if overwrite and out.exists():
        for p in [out / MANIFEST, out / SPLIT, out / REJECTS]:
            p.unlink(missing_ok=True)
        shutil.rmtree(sdir, ignore_errors=True)
    if (out / MANIFEST).exists():
        old = json.loads((out / MANIFEST).read_text())
        if resume and old.get("identity") == identity:
            return
        raise BuildError(f"{out} already holds a complete build"
                         + ("" if not resume else " with other options or another source")
                         + "; use --overwrite or another --out")
    if sdir.exists() and any(sdir.glob("*.lmdb")) and not resume:
        raise BuildError(f"{out} holds a partial build; pass --resume to finish it or --overwrite to start again")
    if sdir.exists():
        want = {store.shard_name(s, identity["options"]["shards"]) for s in range(identity["options"]["shards"])}
        extra = [p.name for p in sdir.glob("*.lmdb") if p.name not in want]
        if extra:
            raise BuildError(f"{sdir} has shards of a build with another shard count: {extra[:3]}; use --overwrite")
    out.mkdir(parents=True, exist_ok=True)


def _stats(v: np.ndarray) -> dict:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"count": 0}
    return {"count": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "max": float(v.max()), "median": float(np.median(v))}


def finalize(out: Path, src, path: Path, known, identity: dict, opts: BuildOptions, n: int, wall: float,
             nproc: int) -> dict:
    """Gather summaries from every shard into manifest.json, split.json and rejects.jsonl."""
    from pymatgen.core.periodic_table import Element

    nshards = opts.shards
    rows, rejects, shard_info = [], [], []
    for s in range(nshards):
        p = out / store.SHARD_DIR / store.shard_name(s, nshards)
        env = store.open_reader(p)
        with env.begin() as txn:
            srows = [(int(k[1:]), s, json.loads(bytes(v))) for k, v in store.iter_prefix(txn, b"s")]
            rejects += [json.loads(bytes(v)) for _, v in store.iter_prefix(txn, b"x")]
        store.close_reader(p)
        rows += srows
        shard_info.append({"file": f"{store.SHARD_DIR}/{p.name}", "count": len(srows),
                           "bytes": p.stat().st_size, "sha256": store.file_sha256(p)})
    rows.sort(key=lambda r: r[0])
    rejects.sort(key=lambda r: r["index"])
    got = {r[0] for r in rows} | {r["index"] for r in rejects}
    if len(rows) + len(rejects) != n or got != set(range(n)):
        raise BuildError(f"shards hold {len(rows)} records + {len(rejects)} rejects for {n} source records")
    names = list(src.target_names())
    y = np.full((len(rows), len(names)), math.nan)
    for k, r in enumerate(rows):
        y[k] = [math.nan if v is None else v for v in r[2]["y"]]
    natoms = np.array([r[2]["natoms"] for r in rows], dtype=np.int64)
    nedges = np.array([r[2]["nedges"] for r in rows], dtype=np.int64)
    atoms_per_el: dict[int, int] = {}
    structs_per_el: dict[int, int] = {}
    for r in rows:
        for zs, c in r[2]["elements"].items():
            z = int(zs)
            atoms_per_el[z] = atoms_per_el.get(z, 0) + c
            structs_per_el[z] = structs_per_el.get(z, 0) + 1
    ids = [r[2]["id"] for r in rows]
    split = make_split(ids, opts.split, opts.seed)
    reasons: dict[str, int] = {}
    for r in rejects:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    manifest = {
        "format": "uae-dist graph LMDB",
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "identity": identity,
        "source": {"path": str(path), "sha256": identity["source_sha256"], "known": known.name if known else None,
                   "records": n, **{k: v for k, v in src.describe().items() if k != "n"}},
        "options": identity["options"],
        "edge_convention": "edge (i, j, shift): vec = pos[j] + shift @ cell - pos[i]; cell rows are lattice vectors",
        "counts": {"source": n, "records": len(rows), "rejected": len(rejects), "reject_reasons": reasons,
                   "atoms": int(natoms.sum()), "edges": int(nedges.sum())},
        "targets": {"names": names, "stats": {t: _stats(y[:, k]) for k, t in enumerate(names)}},
        "elements": {Element.from_Z(z).symbol: {"Z": z, "atoms": atoms_per_el[z], "structures": structs_per_el[z]}
                     for z in sorted(atoms_per_el)},
        "shards": shard_info,
        "split": {"file": SPLIT, "seed": opts.seed, "fractions": list(opts.split),
                  "sizes": {k: len(v) for k, v in split.items()}},
        "build": {"wall_s": round(wall, 3), "processes": nproc, "records_per_s": round(n / max(wall, 1e-9), 2)},
        "records": {"ids": ids, "source_index": [r[0] for r in rows], "shard": [r[1] for r in rows],
                    "natoms": natoms.tolist(), "nedges": nedges.tolist(),
                    "y": [[None if not np.isfinite(v) else float(v) for v in row] for row in y]},
    }
    _write_atomic(out / SPLIT, json.dumps({"seed": opts.seed, "fractions": list(opts.split), **split}))
    _write_atomic(out / REJECTS, "".join(json.dumps(r) + "\n" for r in rejects))
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def make_split(ids: list[str], fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict:
    """Seeded split by id. Ids are ordered by a seeded hash of the id itself and cut at the fractions,
    so the split does not depend on shard or worker counts, and adding or removing a few records
    (other bounds, other rejects) moves only the few ids at the cut points."""
    import hashlib

    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise BuildError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    if len(set(ids)) != len(ids):
        raise BuildError("split needs unique ids")
    key = lambda rid: hashlib.blake2b(f"{seed}\x00{rid}".encode(), digest_size=8).digest()  # noqa: E731
    shuffled = sorted(ids, key=key)
    n_train = int(round(fractions[0] * len(shuffled)))
    n_val = int(round(fractions[1] * len(shuffled)))
    return {"train": shuffled[:n_train], "val": shuffled[n_train:n_train + n_val], "test": shuffled[n_train + n_val:]}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
