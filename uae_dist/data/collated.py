"""A batch's arrays → the ``torch_geometric.data.Batch`` that ``Batch.from_data_list`` makes of
its per-item ``Data`` (same fields and order, dtypes, values, ``batch``/``ptr``, slice and
increment dicts), and a compact form to send it from a DataLoader worker.

Sending: torch passes every tensor storage of a pickled object through a fresh shared-memory
segment (a copy, page faults, a file descriptor the receiver fetches over a socket from a thread
of the busy sender, waiting for its GIL), ~1 ms per storage and per 2 MB on a loaded machine; a
Batch holds ~16 storages (fields, slice and increment dicts) and 40 bytes an edge, which made 2
workers slower than none. In a worker the batch goes as one compact byte buffer
(:class:`Packed`) that the main process expands.

Index arithmetic and copies are NumPy's: torch spreads ops over ~32k elements across its intra-op
threads, and on a loaded machine (the other cores busy with loader workers or training) each such
op waits milliseconds for a thread instead of taking microseconds.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch_geometric.data import Batch, Data

NP_FLOAT = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
# Data's own order (edge_index, y, pos first), which Batch.from_data_list keeps
FIELDS = ("edge_index", "y", "pos", "z", "frac", "cell", "pbc", "shift", "natoms", "idx")
_ALIGN = 64


def arrays(a: dict, idx, f, slot=None) -> dict:
    """Every array of the Batch of the arrays ``a`` (see ``batched.assemble``: ``edge_index``, or
    ``i``/``j``), floats as ``f`` (a NumPy dtype). With ``slot`` (a worker's shared slot,
    :class:`~.ring.SlotWriter`) every array is written into it, those already there kept as they
    are; without it, fields already of the right dtype are used as they are."""
    natoms, nedges = a["natoms"].astype(np.int64, copy=False), a["nedges"]
    nb, n = len(natoms), len(a["z"])

    def place(x, dt):
        x = np.asarray(x)
        if slot is None:
            return x.astype(dt, copy=False)
        if x.dtype == dt and slot.owns(x):
            return x
        out = slot.take(x.shape, dt)
        np.copyto(out, x, casting="unsafe")
        return out

    new = slot.take if slot is not None else (lambda shape, dt: np.empty(shape, dt))
    edge_index = a.get("edge_index")
    if edge_index is None:
        edge_index = new((2, len(a["j"])), np.int64)
        edge_index[0], edge_index[1] = a["i"], a["j"]
    else:
        edge_index = place(edge_index, np.int64)
    ptr, ecum = new((nb + 1,), np.int64), new((nb + 1,), np.int64)
    ptr[0] = ecum[0] = 0
    np.cumsum(natoms, out=ptr[1:])
    np.cumsum(nedges, out=ecum[1:])
    batch = new((n,), np.int64)
    batch[...] = np.repeat(np.arange(nb, dtype=np.int64), natoms)
    graphs, zeros = new((nb + 1,), np.int64), new((nb,), np.int64)
    graphs[...] = np.arange(nb + 1)
    zeros[...] = 0
    return {
        "edge_index": edge_index, "y": place(a["y"], f), "pos": place(a["pos"], f),
        "z": place(a["z"], np.int64), "frac": place(a["frac"], f), "cell": place(a["cell"], f),
        "pbc": place(a["pbc"], np.bool_), "shift": place(a["shift"], np.int64),
        "natoms": place(natoms, np.int64), "idx": place(np.asarray(idx, dtype=np.int64), np.int64),
        "batch": batch, "ptr": ptr, "ecum": ecum, "graphs": graphs, "zeros": zeros,
    }


def tensors(a: dict, idx, dtype: torch.dtype) -> dict:
    """:func:`arrays` as tensors of the batch dtype (``torch.from_numpy``: no copies)."""
    if dtype in (torch.float32, torch.float64):
        return {k: torch.from_numpy(v) for k, v in arrays(a, idx, NP_FLOAT[dtype]).items()}
    # others (bfloat16, which NumPy lacks; float16) cast by torch, as the per-item path does
    out = {k: torch.from_numpy(v) for k, v in arrays(a, idx, np.float64).items()}
    for k in ("y", "pos", "frac", "cell"):
        out[k] = out[k].to(dtype)
    return out


_DATA_BATCH = []  # the class Batch(_base_cls=Data) makes: PyG builds it anew at every call


def make_batch(ts: dict, ids: list) -> Batch:
    if not _DATA_BATCH:
        _DATA_BATCH.append(type(Batch(_base_cls=Data)))
    out = type.__call__(_DATA_BATCH[0])  # Batch(_base_cls=Data) without its per-call inspection
    store = out._store
    # what store[k] = v does for a value that is not None, less PyG's per-key checks
    store._mapping.update({k: ts[k] for k in FIELDS}, id=list(ids), num_nodes=int(ts["ptr"][-1]),
                          batch=ts["batch"], ptr=ts["ptr"])  # from_data_list's key order
    natoms = ts["natoms"]
    store._num_nodes = natoms.tolist()
    per_atom, per_edge, per_graph, zeros = ts["ptr"], ts["ecum"], ts["graphs"], ts["zeros"]
    keys = FIELDS + ("id",)
    out._slice_dict = {k: (per_atom if k in ("z", "pos", "frac") else
                           per_edge if k in ("edge_index", "shift") else per_graph)
                       for k in keys}
    out._inc_dict = {k: (ts["ptr"][:-1] if k == "edge_index" else None if k == "id" else zeros)
                     for k in keys}
    out._num_graphs = len(natoms)
    return out


def to_batch(a: dict, ids: list, idx, dtype: torch.dtype):
    """The Batch; in a DataLoader worker its :class:`Packed` form (which unpickles as it)."""
    if torch.utils.data.get_worker_info() is not None and dtype in NP_FLOAT:
        return Packed.of(a, ids, idx, dtype)
    return make_batch(tensors(a, idx, dtype), ids)


class Packed:
    """A batch in one plain byte buffer, edges compact (``j`` and ``shift`` in the narrowest
    integer types, ``i`` as per-atom counts: ~5 bytes an edge instead of 40); pickles as
    (buffer, layout), so it travels through the worker's pipe like any bytes (no shared-memory
    segment, no file descriptor to fetch), and unpickles as the Batch, expanded by the receiver."""

    def __init__(self, buf: bytearray, layout: list, ids: list, dtype: torch.dtype):
        self.buf, self.layout, self.ids, self.dtype = buf, layout, ids, dtype

    @classmethod
    def of(cls, a: dict, ids: list, idx, dtype: torch.dtype) -> "Packed":
        f = NP_FLOAT[dtype]
        n = len(a["z"])
        arrays = {
            "counts": np.bincount(a["i"], minlength=n),  # i is sorted: counts give it back
            "j": a["j"].astype(np.uint16 if n <= 1 << 16 else np.int64),
            "shift": _smallest(a["shift"]), "z": a["z"].astype(np.uint8),
            "pos": a["pos"].astype(f), "frac": a["frac"].astype(f), "cell": a["cell"].astype(f),
            "y": a["y"].astype(f), "pbc": a["pbc"], "natoms": a["natoms"],
            "nedges": a["nedges"], "idx": np.asarray(idx, dtype=np.int64),
        }
        layout, off = [], 0
        for k, v in arrays.items():
            layout.append((k, v.dtype.str, v.shape, off))
            off += aligned(v.nbytes)
        packed = cls(bytearray(off), layout, list(ids), dtype)
        for k, dst in packed.views().items():
            np.copyto(dst, arrays[k])
        return packed

    def views(self) -> dict:
        # writable: the buffer is a bytearray
        return layout_views(np.frombuffer(self.buf, dtype=np.uint8), self.layout)

    def batch(self) -> Batch:
        v = self.views()
        edge_index = np.empty((2, len(v["j"])), dtype=np.int64)
        edge_index[0] = np.repeat(np.arange(len(v["z"]), dtype=np.int64), v["counts"])
        edge_index[1] = v["j"]  # widened as it is copied
        a = dict(v, edge_index=edge_index, shift=v["shift"].astype(np.int64),
                 z=v["z"].astype(np.int64))
        # float fields are already in the batch dtype: tensors() keeps them (views of buf)
        return make_batch(tensors(a, v["idx"], self.dtype), self.ids)

    def __reduce__(self):
        return _unpack, (self.buf, self.layout, self.ids, self.dtype)


def _unpack(buf, layout, ids, dtype) -> Batch:
    return Packed(buf, layout, ids, dtype).batch()


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the alignment of every array in a packed buffer or a slot."""
    return -(-nbytes // _ALIGN) * _ALIGN


def layout_views(raw: np.ndarray, layout: list) -> dict:
    """The arrays ``(name, dtype str, shape, byte offset)`` of ``layout`` as views of ``raw``."""
    # slices (not np.frombuffer): each view's base is ``raw``, which a slot's finalizer watches
    return {k: raw[off:off + math.prod(shape) * _itemsize(dt)].view(dt).reshape(shape)
            for k, dt, shape, off in layout}


_ITEMSIZE: dict = {}


def _itemsize(dt: str) -> int:
    n = _ITEMSIZE.get(dt)
    if n is None:
        n = _ITEMSIZE[dt] = np.dtype(dt).itemsize
    return n


def _smallest(a: np.ndarray) -> np.ndarray:
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for dt in (np.int8, np.int16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return a.astype(dt)
    return a
