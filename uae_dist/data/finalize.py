"""Gather the shards of a build into manifest.json, split.json and rejects.jsonl.

The manifest is written last and atomically (its presence means "complete"); it records what the
readers check (see :mod:`uae_dist.data.integrity`). A build that kept no record writes its rejects,
removes its shards and fails: a data set of nothing is not a success, and a rerun starts clean.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from . import given_split
from . import lmdb_store as store
from .graph import SCHEMA_VERSION
from .integrity import file_hashes, records_digest
from .layout import FORMAT, MANIFEST, REJECTS, SHARD_DIR, SPLIT, classify, shard_name
from .options import BuildError, BuildOptions


def _stats(v: np.ndarray) -> dict:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"count": 0}
    return {"count": int(v.size), "mean": float(v.mean()), "std": float(v.std()),
            "min": float(v.min()), "max": float(v.max()), "median": float(np.median(v))}


def _read_shards(out: Path, nshards: int):
    rows, rejects, shard_info = [], [], []
    for s in range(nshards):
        p = out / SHARD_DIR / shard_name(s, nshards)
        env = store.open_reader(p)
        with env.begin() as txn:
            srows = [(int(k[1:]), s, json.loads(bytes(v))) for k, v in store.iter_prefix(txn, b"s")]
            rejects += [json.loads(bytes(v)) for _, v in store.iter_prefix(txn, b"x")]
        store.close_reader(p)
        rows += srows
        shard_info.append({"file": f"{SHARD_DIR}/{p.name}", "count": len(srows),
                           "bytes": p.stat().st_size, **file_hashes(p)})
    rows.sort(key=lambda r: r[0])
    rejects.sort(key=lambda r: r["index"])
    return rows, rejects, shard_info


def _reasons(rejects) -> dict:
    reasons: dict[str, int] = {}
    for r in rejects:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return reasons


def finalize(out: Path, src, path: Path, known, identity: dict, opts: BuildOptions, n: int,
             wall: float, nproc: int) -> dict:
    """Write split.json, rejects.jsonl and (last) manifest.json; return the manifest."""
    from pymatgen.core.periodic_table import Element

    rows, rejects, shard_info = _read_shards(out, opts.shards)
    got = {r[0] for r in rows} | {r["index"] for r in rejects}
    if len(rows) + len(rejects) != n or got != set(range(n)):
        raise BuildError(f"shards hold {len(rows)} records + {len(rejects)} rejects for {n} "
                         "source records")
    reasons = _reasons(rejects)
    if not rows:
        write_atomic(out / REJECTS, "".join(json.dumps(r) + "\n" for r in rejects))
        for f in classify(out)[0]:  # our shards: nothing in them is worth resuming
            if f.parent.name == SHARD_DIR:
                f.unlink()
        top = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
        raise BuildError(f"no record kept: all {n} source records were rejected ({top}); see "
                         f"{out / REJECTS} for each reason, fix the source or the options "
                         "(--bound, --targets, --cutoff ...) and build again")
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
    if opts.split_file:
        split, given = given_split.apply(given_split.load(opts.split_file)[0], ids)
        how = {"given": {"file": opts.split_file, "sha256": identity["split_file_sha256"],
                         **given}}
    else:
        split = make_split(ids, opts.split, opts.seed)
        how = {"seed": opts.seed, "fractions": list(opts.split)}
    split_text = json.dumps({**how, **split})
    records = {"ids": ids, "source_index": [r[0] for r in rows], "shard": [r[1] for r in rows],
               "natoms": natoms.tolist(), "nedges": nedges.tolist(),
               "y": [[None if not np.isfinite(v) else float(v) for v in row] for row in y]}
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "identity": identity,
        "source": {"path": str(path), "sha256": identity["source_sha256"],
                   "known": known.name if known else None, "records": n,
                   **{k: v for k, v in src.describe().items() if k != "n"}},
        "options": identity["options"],
        "edge_convention": "edge (i, j, shift): vec = pos[j] + shift @ cell - pos[i]; "
                           "cell rows are lattice vectors",
        "counts": {"source": n, "records": len(rows), "rejected": len(rejects),
                   "reject_reasons": reasons, "atoms": int(natoms.sum()),
                   "edges": int(nedges.sum())},
        "targets": {"names": names, "stats": {t: _stats(y[:, k]) for k, t in enumerate(names)}},
        "elements": {Element.from_Z(z).symbol: {"Z": z, "atoms": atoms_per_el[z],
                                                "structures": structs_per_el[z]}
                     for z in sorted(atoms_per_el)},
        "shards": shard_info,
        "split": {"file": SPLIT, **how, "sizes": {k: len(v) for k, v in split.items()}},
        "integrity": {"records_sha256": records_digest(records),
                      "split_sha256": hashlib.sha256(split_text.encode()).hexdigest()},
        "build": {"wall_s": round(wall, 3), "processes": nproc,
                  "records_per_s": round(n / max(wall, 1e-9), 2)},
        "records": records,
    }
    write_atomic(out / SPLIT, split_text)
    write_atomic(out / REJECTS, "".join(json.dumps(r) + "\n" for r in rejects))
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1, allow_nan=False))
    return manifest


def make_split(ids: list[str], fractions=None, seed: int | None = None) -> dict:
    """Seeded split by id (``None``: the BuildOptions defaults). Ids are ordered by a seeded hash
    of the id itself and cut at the fractions, so the split does not depend on shard or worker
    counts, and adding or removing a few records (other bounds, other rejects) moves only the few
    ids at the cut points."""
    fractions = BuildOptions().split if fractions is None else fractions
    seed = BuildOptions().seed if seed is None else seed
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise BuildError("split fractions must be three non-negative numbers summing to 1, "
                         f"got {fractions}")
    if len(set(ids)) != len(ids):
        raise BuildError("split needs unique ids")

    def key(rid):
        return hashlib.blake2b(f"{seed}\x00{rid}".encode(), digest_size=8).digest()
    shuffled = sorted(ids, key=key)
    n_train = int(round(fractions[0] * len(shuffled)))
    n_val = int(round(fractions[1] * len(shuffled)))
    return {"train": shuffled[:n_train], "val": shuffled[n_train:n_train + n_val],
            "test": shuffled[n_train + n_val:]}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
