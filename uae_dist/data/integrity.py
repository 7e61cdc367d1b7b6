"""What a build records about its output, and the checks that readers make against it.

Recorded in ``manifest.json`` by the build:

* per shard: ``bytes``, ``sha256`` and ``xxh3_128`` (xxHash, ~15x faster than sha256 here);
* ``integrity.records_sha256``: sha256 of the canonical JSON of ``manifest["records"]`` (ids,
  labels, sizes), so an edited label or id in the manifest is noticed without reading a shard;
* ``integrity.split_sha256``: sha256 of ``split.json`` as written.

Checked when a :class:`~uae_dist.data.dataset.CrystalGraphDataset` opens (cheap, every time):
the records digest, split sanity and digest, every shard's size, and every shard's xxh3 --
hashed once per process per file version (path, device, inode, size, mtime_ns): a second split or
a reopen in the same process costs one ``stat`` per shard. Checked as each record is decoded: see
:func:`check_record`. ``uae-dist data verify`` checks all of this plus the sha256 of every shard and
every record against the manifest.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import xxhash

from .graph import MAX_Z

_CHUNK = 1 << 22
_HASHED: dict[tuple, str] = {}  # (path, dev, ino, size, mtime_ns) -> xxh3_128 of that version


class DataError(ValueError):
    """Data on disk that is not what its manifest says; the message names what and what to do."""


def file_hashes(path: Path) -> dict:
    """{"sha256", "xxh3_128"} of a file, in one pass."""
    sha, xxh = hashlib.sha256(), xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while b := fh.read(_CHUNK):
            sha.update(b)
            xxh.update(b)
    return {"sha256": sha.hexdigest(), "xxh3_128": xxh.hexdigest()}


def fast_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while b := fh.read(_CHUNK):
            h.update(b)
    return h.hexdigest()


def records_digest(records: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, no NaN) of ``manifest["records"]``."""
    text = json.dumps(records, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def rebuild_hint(root) -> str:
    return (f"run `uae-dist data verify {root}` for every problem, then rebuild the data set "
            "(uae-dist data build --overwrite ...)")


def check_manifest_records(root, manifest: dict) -> None:
    """The manifest's record table is the one the build wrote (digest, lengths)."""
    rec = manifest["records"]
    want = manifest.get("integrity", {}).get("records_sha256")
    n = len(rec["ids"])
    for key in ("source_index", "shard", "natoms", "nedges", "y"):
        if len(rec[key]) != n:
            raise DataError(f"{root}/manifest.json: records.{key} has {len(rec[key])} entries, "
                            f"records.ids has {n}; {rebuild_hint(root)}")
    if want is None or records_digest(rec) != want:
        raise DataError(f"{root}/manifest.json: the record table (ids, labels, sizes) is not the "
                        f"one the build wrote (records_sha256 differs): it was edited or damaged; "
                        f"{rebuild_hint(root)}")


def split_problems(split: dict, ids: list[str]) -> list[str]:
    """Why ``split`` (train/val/test id lists) is not a partition of ``ids`` (empty: it is)."""
    problems = []
    known = set(ids)
    seen: dict[str, str] = {}
    for part in ("train", "val", "test"):
        members = split.get(part)
        if not isinstance(members, list):
            problems.append(f"{part}: missing or not a list of ids")
            continue
        for rid in members:
            if rid in seen:
                problems.append(f"id {rid!r} listed in {seen[rid]} and in {part}"
                                if seen[rid] != part else f"id {rid!r} listed twice in {part}")
            elif rid not in known:
                problems.append(f"{part}: id {rid!r} is not a record of this data set")
            seen.setdefault(rid, part)
    missing = known - set(seen)
    if missing:
        problems.append(f"{len(missing)} record(s) in no split, e.g. {sorted(missing)[:3]}")
    return problems


def check_split(root, manifest: dict, raw: bytes) -> dict:
    """Parse split.json, check it partitions the records and is the file the build wrote."""
    try:
        split = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{root}/split.json: not valid JSON ({e}); {rebuild_hint(root)}") from None
    problems = split_problems(split, manifest["records"]["ids"]) if isinstance(split, dict) \
        else ["not a JSON object"]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError(f"{root}/split.json: {'; '.join(problems[:3])}{more}; "
                        f"{rebuild_hint(root)}")
    want = manifest.get("integrity", {}).get("split_sha256")
    if want is None or hashlib.sha256(raw).hexdigest() != want:
        raise DataError(f"{root}/split.json: not the split the build wrote (sha256 differs); "
                        f"{rebuild_hint(root)}")
    return split


def check_shard_file(root, info: dict, hash_it: bool = True) -> Path:
    """A shard exists, is a regular file of the manifest's size and (``hash_it``) has its xxh3."""
    p = Path(root) / info["file"]
    try:
        st = os.stat(p)
    except OSError as e:
        raise DataError(f"{p}: cannot read it ({e.strerror}); {rebuild_hint(root)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{p}: not a regular file; {rebuild_hint(root)}")
    if st.st_size != info["bytes"]:
        raise DataError(f"{p}: {st.st_size:,} bytes, the manifest says {info['bytes']:,}: the "
                        f"shard is truncated or was changed; {rebuild_hint(root)}")
    if hash_it:
        key = (str(p.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        got = _HASHED.get(key)
        if got is None:
            got = _HASHED[key] = fast_hash(p)
        if got != info["xxh3_128"]:
            del _HASHED[key]
            raise DataError(f"{p}: content differs from the build (xxh3 {got[:12]}… != manifest "
                            f"{info['xxh3_128'][:12]}…): the shard is damaged; "
                            f"{rebuild_hint(root)}")
    return p


def _labels(y) -> np.ndarray:
    if isinstance(y, np.ndarray):
        return y
    return np.array([math.nan if v is None else v for v in y], dtype=np.float64)


def _same_labels(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal, NaN matching NaN (a handful of values: plain Python is faster than numpy here)."""
    if got.shape != want.shape:
        return False
    return all(a == b or (a != a and b != b) for a, b in zip(got.tolist(), want.tolist()))


def check_record(r: dict, rid: str, natoms: int, nedges: int, y, where: str) -> None:
    """A decoded record is the manifest's record ``rid``: same id, sizes and labels; finite
    geometry; elements and edge indices in range. ``y``: the manifest's labels (None or NaN: not
    labelled). Raises DataError naming the record and shard.

    The common case is one pass of cheap tests (~10 us); only a failing record is examined in
    detail for the message."""
    z, pos, frac, cell, i, j = r["z"], r["pos"], r["frac"], r["cell"], r["i"], r["j"]
    n, e = len(z), len(j)
    want = _labels(y)
    if (r.get("id") == rid and n == natoms and e == nedges and len(i) == e == len(r["shift"])
            and pos.shape == (n, 3) and frac.shape == (n, 3) and cell.shape == (3, 3)
            # one NaN/inf makes the sum non-finite; finite coordinates cannot overflow it
            and math.isfinite(float(pos.sum()) + float(frac.sum()) + float(cell.sum()))
            and (n == 0 or (z.min() >= 1 and z.max() <= MAX_Z))
            and (e == 0 or (j.max() < n and i[-1] < n))  # i is sorted (CSR)
            and _same_labels(np.asarray(r["y"], dtype=np.float64), want)):
        return
    bad = []
    if r.get("id") != rid:
        bad.append(f"holds id {r.get('id')!r}")
    if n != natoms:
        bad.append(f"{n} atoms, the manifest says {natoms}")
    if e != nedges or len(i) != e or len(r["shift"]) != e:
        bad.append(f"{e} edges, the manifest says {nedges}")
    for f in ("pos", "frac", "cell"):
        if not np.isfinite(r[f]).all():
            bad.append(f"{f} has NaN/inf entries")
    if pos.shape != (n, 3) or frac.shape != (n, 3) or cell.shape != (3, 3):
        bad.append("arrays of the wrong shape")
    if n and (z.min() < 1 or z.max() > MAX_Z):
        bad.append("atomic number out of range")
    if e and (j.max() >= n or i.max() >= n):
        bad.append("edge index out of range")
    got = np.asarray(r["y"], dtype=np.float64)
    if not _same_labels(got, want):
        bad.append(f"labels {got.tolist()} differ from the manifest's {want.tolist()}")
    raise DataError(f"record {rid!r} in {where}: {'; '.join(bad) or 'inconsistent'}: the data set "
                    "is damaged; find every problem with `uae-dist data verify DIR`, then "
                    "rebuild it")
