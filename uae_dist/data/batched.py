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
_FIXED = {"z": "U8", "pos": "F64", "frac": "F64", "cell": "F64", "pbc": "U8", "y": "F64"}
_INTS = ("nbr_count", "j", "shift")
_FIELDS = frozenset(_FIXED) | frozenset(_INTS) | {"__metadata__"}


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
        shapes = {"z": [n], "pos": [n, 3], "frac": [n, 3], "cell": [3, 3], "pbc": [3], "y": [t],
                  "nbr_count": [n], "j": [e], "shift": [e, 3]}
        base, out = 8 + hlen, {}
        for name, shape in shapes.items():
            info = h[name]
            dt = _DT[info["dtype"]]
            (b, end), count = info["data_offsets"], math.prod(shape)
            want = _FIXED.get(name)
            if (info["shape"] != shape or (want is not None and info["dtype"] != want)
                    or end - b != count * dt().itemsize or base + end > len(blob)):
                raise Slow
            out[name] = np.frombuffer(blob, dt, count, base + b)
        return out
    except Slow:
        raise
    except Exception:  # noqa: BLE001 - anything unparsable goes to the per-item path's messages
        raise Slow from None


def _cat(parts, dtype) -> np.ndarray:
    return np.concatenate(parts, dtype=dtype, casting="same_kind") if len(parts) > 1 \
        else parts[0].astype(dtype)


def assemble(recs: list[dict], natoms: np.ndarray, nedges: np.ndarray, y_want: np.ndarray):
    """Concatenated arrays of a batch of parsed records (graph-major), with ``i``/``j`` as global
    atom indices; Slow if a batch-wide check fails (then the per-item path decides)."""
    cols = {f: [r[f] for r in recs] for f in recs[0]}
    z = _cat(cols["z"], np.int64)
    pos = _cat(cols["pos"], np.float64).reshape(-1, 3)
    frac = _cat(cols["frac"], np.float64).reshape(-1, 3)
    cell = _cat(cols["cell"], np.float64).reshape(-1, 3, 3)
    counts = _cat(cols["nbr_count"], np.int64)
    j = _cat(cols["j"], np.int64)
    shift = _cat(cols["shift"], np.int64).reshape(-1, 3)
    y = _cat(cols["y"], np.float64).reshape(len(recs), -1)
    pbc = _cat(cols["pbc"], np.uint8).reshape(-1, 3)
    atom0 = np.zeros(len(recs) + 1, dtype=np.int64)
    np.cumsum(natoms, out=atom0[1:])
    edge_n = np.repeat(natoms, nedges)  # atoms of each edge's graph
    ok = (bool(natoms.all())
          and np.array_equal(np.add.reduceat(counts, atom0[:-1]), nedges)
          and math.isfinite(float(pos.sum()) + float(frac.sum()) + float(cell.sum()))
          and (len(z) == 0 or (int(z.min()) >= 1 and int(z.max()) <= MAX_Z))
          and bool((j < edge_n).all())
          and np.array_equal(y, y_want, equal_nan=True))
    if not ok:
        raise Slow
    i = np.repeat(np.arange(len(z), dtype=np.int64), counts)  # CSR: centres in order
    j += np.repeat(atom0[:-1], nedges)
    return {"z": z, "pos": pos, "frac": frac, "cell": cell, "pbc": pbc.astype(bool), "y": y,
            "i": i, "j": j, "shift": shift, "natoms": natoms, "nedges": nedges}


def _rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[idx]`` for a C-contiguous 2-D array, as one 1-D gather of whole rows (NumPy's 2-D
    fancy indexing is ~5x slower)."""
    return a.view(np.dtype((np.void, a.shape[1] * a.itemsize))).ravel()[idx] \
        .view(a.dtype).reshape(-1, a.shape[1])


def narrow(a: dict, cutoff: float | None, max_neighbors: int | None) -> dict:
    """Keep the edges within ``cutoff`` and then the ``max_neighbors`` nearest of each centre,
    for a whole batch at once (``i``/``j`` global, edges graph-major). The per-item path calls
    this too (a batch of one), so both give the same edges to the last bit."""
    i, j, shift, nedges = a["i"], a["j"], a["shift"], a["nedges"]
    d = edge_lengths(a["pos"], a["cell"], i, j, shift, nedges)
    keep = np.ones(len(d), dtype=bool) if cutoff is None else d <= cutoff
    if max_neighbors is not None:
        keep[keep] = cap_mask(i[keep], d[keep], max_neighbors)
    idx = np.flatnonzero(keep)
    ecum = np.concatenate([[0], np.cumsum(nedges)])
    out = dict(a)
    out.update(i=i[idx], j=j[idx], shift=_rows(np.ascontiguousarray(shift), idx),
               nedges=np.diff(np.searchsorted(idx, ecum)))  # kept edges of each graph
    return out
