"""Sharded LMDB storage: one LMDB file per writer, opened lazily (once per process) by readers.

Keys inside a shard (``%010d`` is the record's position in the source, so shards from any number of
writers merge back into source order):
  ``r%010d`` → encoded graph record      ``s%010d`` → JSON summary (id, natoms, nedges, y, elements)
  ``x%010d`` → JSON reject               ``__meta__`` → JSON identity of the build (source, options)
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lmdb

MAP_SIZE = 1 << 38  # virtual; the file grows only as data is written
SHARD_DIR = "shards"


def shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}.lmdb"


def rkey(prefix: str, index: int) -> bytes:
    return f"{prefix}{index:010d}".encode()


def open_writer(path: Path) -> lmdb.Environment:
    path.parent.mkdir(parents=True, exist_ok=True)
    # sync on commit: a committed batch survives SIGKILL and power loss alike
    return lmdb.open(str(path), subdir=False, map_size=MAP_SIZE, readahead=False, meminit=False, max_dbs=0)


_READERS: dict[str, tuple[int, lmdb.Environment]] = {}


def open_reader(path: Path) -> lmdb.Environment:
    """Read-only environment, one per file per process (lmdb refuses a second open in one process;
    an environment inherited through fork must not be reused)."""
    key = str(Path(path).resolve())
    pid = os.getpid()
    hit = _READERS.get(key)
    if hit is not None:
        if hit[0] == pid:
            return hit[1]
        # inherited through fork: release the parent's handle in this process (read-only, no lock
        # table, so nothing is shared that closing could disturb), then open our own
        hit[1].close()
    env = lmdb.open(key, subdir=False, readonly=True, lock=False, readahead=False, meminit=False, max_readers=512)
    _READERS[key] = (pid, env)
    return env


def close_reader(path: Path) -> None:
    hit = _READERS.pop(str(Path(path).resolve()), None)
    if hit is not None and hit[0] == os.getpid():
        hit[1].close()


def get_json(txn, key: bytes):
    v = txn.get(key)
    return None if v is None else json.loads(bytes(v))


def put_json(txn, key: bytes, obj) -> None:
    txn.put(key, json.dumps(obj, allow_nan=False).encode())


def iter_prefix(txn, prefix: bytes):
    """(key, value) pairs whose key starts with ``prefix``, in key order."""
    cur = txn.cursor()
    if not cur.set_range(prefix):
        return
    for k, v in cur:
        if not bytes(k).startswith(prefix):
            break
        yield bytes(k), v


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
