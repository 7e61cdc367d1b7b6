"""Sharded LMDB storage: one LMDB file per writer, opened lazily (once per process) by readers.

Keys inside a shard (``%010d`` is the record's position in the source, so shards from any number of
writers merge back into source order):
  ``r%010d`` → encoded graph record  ``s%010d`` → JSON summary (id, natoms, nedges, y, elements)
  ``x%010d`` → JSON reject           ``__meta__`` → JSON identity of the build (source, options)
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import lmdb

from .integrity import DataError

MAP_SIZE = 1 << 38  # virtual; the file grows only as data is written
_MIN_BYTES = 2 * 4096  # LMDB's two meta pages


def rkey(prefix: str, index: int) -> bytes:
    return f"{prefix}{index:010d}".encode()


def open_writer(path: Path) -> lmdb.Environment:
    path.parent.mkdir(parents=True, exist_ok=True)
    # sync on commit: a committed batch survives SIGKILL and power loss alike
    return lmdb.open(str(path), subdir=False, map_size=MAP_SIZE, readahead=False, meminit=False,
                     max_dbs=0)


_READERS: dict[str, tuple[int, lmdb.Environment]] = {}
_RESOLVED: dict[str, str] = {}  # path as given -> resolved path (the key of _READERS)


def open_reader(path: Path, expect_bytes: int | None = None) -> lmdb.Environment:
    """Read-only environment, one per file per process (lmdb refuses a second open in one process;
    an environment inherited through fork must not be reused).

    Before mapping a file it must be a regular file of ``expect_bytes`` (when given) and hold every
    page its LMDB header names: reading a page past the end of a mapped file is SIGBUS, which kills
    the process without a message. Raises DataError naming the file instead.
    """
    key = _RESOLVED.get(str(path))
    if key is None:  # resolving costs ~20 us: once per spelling of the path
        key = _RESOLVED[str(path)] = str(Path(path).resolve())
    pid = os.getpid()
    hit = _READERS.get(key)
    if hit is not None:
        if hit[0] == pid:
            return hit[1]
        # inherited through fork: release the parent's handle in this process (read-only, no lock
        # table, so nothing is shared that closing could disturb), then open our own
        hit[1].close()
        del _READERS[key]
    size = _check_size(key, expect_bytes)
    try:
        env = lmdb.open(key, subdir=False, readonly=True, lock=False, readahead=False,
                        meminit=False, max_readers=512)
    except lmdb.Error as e:
        raise DataError(f"{path}: cannot open as LMDB ({e}); the shard is damaged") from None
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if need > size:
        env.close()
        raise DataError(f"{path}: truncated: its LMDB header names {need:,} bytes of pages, the "
                        f"file has {size:,}; the shard is damaged (rebuild it)")
    _READERS[key] = (pid, env)
    return env


def _check_size(path: str, expect_bytes: int | None) -> int:
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: not a regular file")
    if expect_bytes is not None and st.st_size != expect_bytes:
        raise DataError(f"{path}: {st.st_size:,} bytes, the manifest says {expect_bytes:,}: "
                        "truncated or changed since the build")
    if st.st_size < _MIN_BYTES:
        raise DataError(f"{path}: {st.st_size:,} bytes, too short for an LMDB file (truncated)")
    return st.st_size


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
