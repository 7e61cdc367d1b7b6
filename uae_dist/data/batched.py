"""A whole batch of graph records in one pass: decode, check, concatenate, narrow.

``CrystalGraphDataset.__getitems__`` reads a batch's records (one LMDB transaction per shard) and
hands their blobs here. Each record's safetensors header is parsed once and its arrays are NumPy
views of the blob (no copies, no per-record int64 expansion); the batch is then concatenated once
per field, with edge indices offset, narrowed as a whole, and made into the Batch that
``Batch.from_data_list`` makes of the per-item ``Data`` (:mod:`.collated`).

Integrity: a record is taken on the fast path only if its header, sizes, id, labels, finiteness and
index ranges pass vectorised checks that are *stricter* than :func:`~.integrity.check_record`. A
batch with any record off the fast path is redone record by record through ``decode_record`` +
``check_record`` (the per-item path), so damage raises the same DataError naming the record.
"""
from __future__ import annotations

import json
import math

import numpy as np

from .graph import MAX_Z
from ..ops.geometry import edge_lengths
from ..ops.neighbors_ref import cap_mask

_DT = {"U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "I8": np.int8, "I16": np.int16,
       "I32": np.int32, "I64": np.int64, "F64": np.float64}
_SIZE = {k: np.dtype(v).itemsize for k, v in _DT.items()}
_FIELDS = frozenset(("z", "pos", "frac", "cell", "pbc", "y", "nbr_count", "j", "shift",
                     "__metadata__"))


class Slow(Exception):
    """A record the fast path does not take (damaged, or merely unusual): use the per-item path."""


def parse(blob: bytes, rid: str, n: int, e: int, t: int) -> dict:
    """NumPy views of one record's arrays, or Slow unless it is exactly the expected layout:
    the id ``rid``, ``n`` atoms, ``e`` edges, ``t`` labels, every array within the blob."""
    try:
        hlen = int.from_bytes(blob[:8], "little")
        h = json.loads(blob[8:8 + hlen])
        if h.keys() != _FIELDS or h["__metadata__"].get("id") != rid:
            raise Slow
        base, size, out = 8 + hlen, len(blob), {}
        for name, want, shape in (("z", "U8", [n]), ("pos", "F64", [n, 3]),
                                  ("frac", "F64", [n, 3]), ("cell", "F64", [3, 3]),
                                  ("pbc", "U8", [3]), ("y", "F64", [t]),
                                  ("nbr_count", None, [n]), ("j", None, [e]),
                                  ("shift", None, [e, 3])):
            info = h[name]
            dt = info["dtype"]
            b, end = info["data_offsets"]
            count = shape[0] * shape[1] if len(shape) == 2 else shape[0]
            if (info["shape"] != shape or (want is not None and dt != want)
                    or end - b != count * _SIZE[dt] or base + end > size):
                raise Slow
            out[name] = np.frombuffer(blob, _DT[dt], count, base + b)
        return out
    except Slow:
        raise
    except Exception:  # noqa: BLE001 - anything unparsable goes to the per-item path's messages
        raise Slow from None


def _cat(parts, dtype) -> np.ndarray:
    return np.concatenate(parts, dtype=dtype, casting="same_kind") if len(parts) > 1 \
        else parts[0].astype(dtype)


def empty(shape, dtype) -> np.ndarray:
    return np.empty(shape, dtype)


def assemble(recs: list[dict], natoms: np.ndarray, nedges: np.ndarray, y_want: np.ndarray,
             new=empty):
    """Concatenated arrays of a batch of parsed records (graph-major): ``edge_index`` with global
    atom indices (``i``/``j`` are its rows) and ``shift``, both int64 and allocated by ``new(shape,
    dtype)`` (a worker's shared slot: written once, where the Batch will read them); Slow if a
    check fails (then the per-item path decides)."""
    nb = len(recs)
    cols = {f: [r[f] for r in recs] for f in ("z", "pos", "frac", "cell", "nbr_count", "y", "pbc")}
    z = _cat(cols["z"], np.int64)
    pos = _cat(cols["pos"], np.float64).reshape(-1, 3)
    frac = _cat(cols["frac"], np.float64).reshape(-1, 3)
    cell = _cat(cols["cell"], np.float64).reshape(-1, 3, 3)
    counts = _cat(cols["nbr_count"], np.int64)
    y = _cat(cols["y"], np.float64).reshape(nb, -1)
    pbc = _cat(cols["pbc"], np.uint8).reshape(-1, 3)
    atom0 = np.zeros(nb + 1, dtype=np.int64)
    np.cumsum(natoms, out=atom0[1:])
    ok = (bool(natoms.all()) and (len(counts) == 0 or int(counts.min()) >= 0)
          and np.array_equal(np.add.reduceat(counts, atom0[:-1]), nedges)
          and math.isfinite(float(pos.sum()) + float(frac.sum()) + float(cell.sum()))
          and (len(z) == 0 or (int(z.min()) >= 1 and int(z.max()) <= MAX_Z))
          and np.array_equal(y, y_want, equal_nan=True))
    if not ok:
        raise Slow
    edge_index = new((2, int(nedges.sum())), np.int64)
    i, j = edge_index
    e0 = 0
    for r, a0, n, e in zip(recs, atom0.tolist(), natoms.tolist(), nedges.tolist()):
        rj = r["j"]  # within its graph (checked here, on the record's small array): offset
        if e and (int(rj.max()) >= n or (rj.dtype.kind == "i" and int(rj.min()) < 0)):
            raise Slow
        np.add(rj, a0, out=j[e0:e0 + e], dtype=np.int64)  # widened as it is written
        e0 += e
    i[...] = np.repeat(np.arange(len(z), dtype=np.int64), counts)  # CSR: centres in order
    shift = new((e0, 3), np.int64)
    if e0:
        np.concatenate([r["shift"] for r in recs], out=shift.reshape(-1), casting="same_kind")
    return {"z": z, "pos": pos, "frac": frac, "cell": cell, "pbc": pbc.astype(bool), "y": y,
            "edge_index": edge_index, "i": i, "j": j, "shift": shift, "natoms": natoms,
            "nedges": nedges}


def narrow(a: dict, cutoff: float | None, max_neighbors: int | None, new=empty) -> dict:
    """Keep the edges within ``cutoff`` and then the ``max_neighbors`` nearest of each centre,
    for a whole batch at once (``i``/``j`` global, edges graph-major), the kept edges gathered
    into ``edge_index`` and ``shift`` allocated by ``new``. The per-item path calls this too (a
    batch of one), so both give the same edges to the last bit."""
    i, j, shift, nedges = a["i"], a["j"], np.ascontiguousarray(a["shift"]), a["nedges"]
    d = edge_lengths(a["pos"], a["cell"], i, j, shift, nedges)
    keep = np.ones(len(d), dtype=bool) if cutoff is None else d <= cutoff
    if max_neighbors is not None:
        keep[keep] = cap_mask(i[keep], d[keep], max_neighbors)
    idx = np.flatnonzero(keep)
    ecum = np.concatenate([[0], np.cumsum(nedges)])
    edge_index, out_shift = new((2, len(idx)), np.int64), new((len(idx), 3), shift.dtype)
    np.take(i, idx, out=edge_index[0])
    np.take(j, idx, out=edge_index[1])
    row = np.dtype((np.void, 3 * shift.itemsize))  # a whole row per element: one 1-D gather
    np.take(shift.view(row).ravel(), idx, out=out_shift.view(row).ravel())
    out = dict(a)
    out.update(edge_index=edge_index, i=edge_index[0], j=edge_index[1], shift=out_shift,
               nedges=np.diff(np.searchsorted(idx, ecum)))  # kept edges of each graph
    return out
