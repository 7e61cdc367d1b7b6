"""Write one shard: every ``shards``-th source record → graph record, summary or reject.

Each shard is written by exactly one process (a worker of the local pool or an MPI rank), committing
``commit_every`` records at a time together with their summaries and rejects, so a writer killed at
any moment leaves only whole records behind and its shard resumes with nothing missing and nothing
twice. One bad structure becomes a reject with a reason; it never stops the shard.
"""
from __future__ import annotations

import math
import traceback
from pathlib import Path

import numpy as np

from . import given_split
from . import lmdb_store as store
from .crystal import ParseError
from .graph import GraphOptions, RejectError, build_graph, check_labels, encode_record, \
    validate_crystal
from .layout import SHARD_DIR, shard_name
from .options import BuildError, BuildOptions


def neighbor_fn():
    try:  # compiled op when available (issue 3), identical output to the reference
        from uae_dist.ops import neighbor_list_np
        return neighbor_list_np
    except ImportError:
        from uae_dist.ops import neighbor_list_numpy
        return neighbor_list_numpy


def open_source(path, opts: BuildOptions):
    from .sources import open_source as _open
    return _open(path, fmt=opts.fmt, id_key=opts.id_key, cif_key=opts.cif_key,
                 targets=opts.targets, fast_cif=opts.fast_cif)


def process_one(src, k: int, dup_of: dict, opts: BuildOptions, gopts: GraphOptions, nfn,
                listed: dict | None = None):
    """Source record ``k`` → ('r', blob, summary) or ('x', reject). ``listed``: the ids of a
    given split (``--split-file``); the others are rejected."""
    rec_id = None
    try:
        rec = src.record(k)
        rec_id = rec.id
        if rec.problem is not None:
            raise RejectError(*rec.problem)
        if listed is not None and rec.id not in listed:
            raise RejectError("not_in_split", f"id {rec.id!r} is in no part of "
                                              f"{opts.split_file}")
        if k in dup_of:
            raise RejectError("duplicate_id", f"id {rec.id!r} already used by source record "
                                              f"{dup_of[k]}")
        names = src.target_names()
        y = np.array([rec.targets.get(t, math.nan) for t in names], dtype=np.float64)
        check_labels(dict(zip(names, y.tolist())), opts.bounds)
        try:
            c = src.parse(rec)
        except ParseError as e:
            raise RejectError(e.reason, str(e)) from None
        except ValueError as e:  # a reader's own errors
            raise RejectError("parse_error", str(e)) from None
        if src.per_atom:  # derived KEY_per_atom targets: the source's KEY over the atom count
            y[[names.index(t) for t in src.per_atom]] /= max(len(c.numbers), 1)
            check_labels(dict(zip(names, y.tolist())), opts.bounds)
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
        where = traceback.format_exc(limit=2).splitlines()[-1]
        return "x", {"index": k, "id": rec_id, "reason": "internal_error",
                     "detail": f"{type(e).__name__}: {e} | {where}"}


def build_shard(job: dict, progress=None) -> dict:
    """Write (or finish) one shard. ``progress(kind, value)`` is told ``("chunk", (first, last))``
    before each transaction's records are built and ``("done", n)`` after they are committed."""
    out, shard, nshards = Path(job["out"]), job["shard"], job["nshards"]
    opts = BuildOptions.from_identity(job["options"])
    gopts = GraphOptions(opts.cutoff, opts.max_neighbors, opts.max_pairs)
    src = open_source(job["source"], opts)
    nfn = neighbor_fn()
    dup_of = {int(k): v for k, v in job["dup_of"].items()}
    listed = given_split.load(opts.split_file)[0] if opts.split_file else None
    path = out / SHARD_DIR / shard_name(shard, nshards)
    env = store.open_writer(path)
    try:
        with env.begin(write=True) as txn:
            meta = store.get_json(txn, b"__meta__")
            if meta is None:
                store.put_json(txn, b"__meta__", job["identity"] | {"shard": shard, "of": nshards})
            elif {k: v for k, v in meta.items() if k not in ("shard", "of")} != job["identity"]:
                raise BuildError(f"{path}: written by a build with other options or another "
                                 "source; use a new --out or --overwrite")
        with env.begin() as txn:
            done = {int(k[1:]) for k, _ in store.iter_prefix(txn, b"s")}
            done |= {int(k[1:]) for k, _ in store.iter_prefix(txn, b"x")}
        todo = [k for k in range(shard, job["n"], nshards) if k not in done]
        n_ok = n_bad = 0
        step = job["commit_every"]
        for c0 in range(0, len(todo), step):
            chunk = todo[c0:c0 + step]
            if progress is not None:
                progress("chunk", (chunk[0], chunk[-1]))
            results = [(k, process_one(src, k, dup_of, opts, gopts, nfn, listed)) for k in chunk]
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
                progress("done", len(chunk))
    finally:
        env.close()
    return {"shard": shard, "written": n_ok, "rejected": n_bad, "skipped": len(done)}
