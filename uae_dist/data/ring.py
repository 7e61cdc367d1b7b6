"""Shared-memory slots that DataLoader workers write whole batches into.

Why: a worker's batch reaches the main process through a pipe, and whatever the main process then
does per edge competes with the workers for the same cores. Sent as :class:`~.collated.Packed`
(~5 bytes an edge) the main process still widens it to the Batch's 40 bytes an edge: at 8 Å on
2 cores that costs 0.7 ms of the 1.1 ms a batch takes to load without workers, so 2 workers were
slower than none. Here the worker writes the Batch's final arrays (its dtypes, its layout) into a
slot of memory the main process shares, and sends only the slot's number and layout; the main
process wraps the slot's bytes as the Batch's tensors without a copy.
A worker reserves its slot before it parses (:meth:`BatchRing.writer`), so the edge arrays
are assembled in the slot itself rather than copied there afterwards.

How: :class:`GraphLoader` maps one anonymous shared region before it forks its workers (worker
``w`` owns slots ``w*K .. w*K+K-1``). A slot is taken by a worker and handed back when the last
tensor of its Batch dies in the main process (``weakref.finalize`` on the slot's root array), so a
slot is never written while anything can still read it. When a worker finds no free slot (the
consumer keeps its batches), a batch is larger than a slot, or the workers were not forked (the
spawn or forkserver start methods), the batch goes as ``Packed``: slower, the same Batch.
"""
from __future__ import annotations

import itertools
import math
import mmap
import os
import weakref

import numpy as np
import torch

from .collated import NP_FLOAT, aligned, arrays, layout_views, make_batch

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if os.uname().sysname == "Linux" else 0)
# token -> ring, in the process that mapped it; a ring lives while its loader, an iterator of it or
# one of its batches does (each slot's finalizer holds it)
_RINGS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_TOKENS = itertools.count()
_FORKING = None  # the ring a GraphLoader's workers inherit while it forks them


def batch_bytes(atoms, edges, graphs, targets: int, float_bytes: int):
    """Upper bound on the bytes of a Batch's arrays (:func:`~.collated.arrays`) in a slot."""
    per_atom = 16 + 6 * float_bytes  # z, batch; pos, frac
    per_graph = 8 * 7 + 3 + (9 + targets) * float_bytes  # natoms idx ptr ecum graphs zeros; pbc
    return 40 * edges + per_atom * atoms + per_graph * graphs + 24 * aligned(1)  # gaps, ≤ 1 per array


class SlotFull(Exception):
    """A batch larger than its slot (then it is sent another way)."""


class BatchRing:
    """``workers * per_worker`` slots of ``slot_bytes`` each in one shared anonymous mapping
    (reserved, not committed: only the pages batches touch cost memory)."""

    def __init__(self, workers: int, per_worker: int, slot_bytes: int):
        self.workers, self.per_worker = int(workers), int(per_worker)
        self.nslots = self.workers * self.per_worker
        self.slot_bytes = -(-int(slot_bytes) // 4096) * 4096
        self.head = -(-self.nslots // 4096) * 4096  # one state byte per slot: 0 free, 1 taken
        self.mm = mmap.mmap(-1, self.head + self.nslots * self.slot_bytes,
                            flags=mmap.MAP_SHARED | _MAP_NORESERVE)
        self.state = np.frombuffer(self.mm, np.uint8, self.nslots)
        self.held: set = set()  # slots whose Batch is alive in this (the owning) process
        self.owner = os.getpid()
        self.token = (self.owner, next(_TOKENS))
        _RINGS[self.token] = self

    def __reduce__(self):  # a spawned worker cannot share the mapping: it sends Packed
        return _detached, ()

    def reset(self) -> None:
        """Free the slots no Batch of this process holds (those a stopped worker had taken)."""
        for s in range(self.nslots):
            if s not in self.held:
                self.state[s] = 0

    def writer(self, dtype: torch.dtype):
        """In worker ``w``: a free slot of ``w``, taken, as a :class:`SlotWriter`; None when no
        slot is free or this is no worker of the ring (then the batch goes another way)."""
        info = torch.utils.data.get_worker_info()
        if info is None or os.getpid() == self.owner or dtype not in NP_FLOAT \
                or info.id >= self.workers:
            return None
        first = info.id * self.per_worker
        for slot in range(first, first + self.per_worker):
            if self.state[slot] == 0:
                self.state[slot] = 1
                return SlotWriter(self, slot)
        return None

    def put(self, a: dict, ids: list, idx, dtype: torch.dtype):
        """The batch of arrays ``a`` copied into a free slot (see :meth:`writer`), or None."""
        w = self.writer(dtype)
        return w.finish(a, ids, idx, dtype) if w is not None else None

    def open(self, slot: int, layout: list) -> dict:
        """In the owning process: the slot's arrays (views), the slot freed when they all die."""
        root = np.frombuffer(self.mm, np.uint8, self.slot_bytes, self.head + slot * self.slot_bytes)
        self.held.add(slot)
        weakref.finalize(root, self._release, slot)
        return layout_views(root, layout)

    def _release(self, slot: int) -> None:
        self.held.discard(slot)
        self.state[slot] = 0


def _detached():
    return None


def forking_ring():
    """The ring of the loader whose workers this process's DataLoader worker belongs to."""
    return _FORKING


class SlotWriter:
    """A taken slot that hands out its memory in order (:meth:`take`, ``new`` of
    ``batched.assemble``), so that a batch's arrays are written once, where the Batch reads them;
    :meth:`finish` places the rest and gives the :class:`RingBatch`."""

    def __init__(self, ring: BatchRing, slot: int):
        self.ring, self.slot, self.used = ring, slot, 0
        self.raw = np.frombuffer(ring.mm, np.uint8, ring.slot_bytes,
                                 ring.head + slot * ring.slot_bytes)
        self.at = self.raw.ctypes.data

    def take(self, shape, dt) -> np.ndarray:
        """An uninitialised array in the slot; :class:`SlotFull` past its end."""
        dt = np.dtype(dt)
        nbytes = math.prod(shape) * dt.itemsize
        off = self.used
        if off + nbytes > self.ring.slot_bytes:
            raise SlotFull
        self.used = off + aligned(nbytes)
        return self.raw[off:off + nbytes].view(dt).reshape(shape)

    def owns(self, x: np.ndarray) -> bool:
        """Whether ``x`` lies in this slot (was made by :meth:`take`: no copy needed)."""
        p = x.__array_interface__["data"][0]
        return self.at <= p < self.at + self.ring.slot_bytes

    def finish(self, a: dict, ids: list, idx, dtype: torch.dtype):
        """The batch (arrays ``a``, some already taken from here) as a RingBatch; None, the slot
        given back, when it does not fit."""
        try:
            out = arrays(a, idx, NP_FLOAT[dtype], self)
        except SlotFull:
            self.cancel()
            return None
        layout = [(k, v.dtype.str, v.shape, v.__array_interface__["data"][0] - self.at)
                  for k, v in out.items()]
        return RingBatch(self.ring.token, self.slot, layout, list(ids), dtype)

    def cancel(self) -> None:
        self.ring.state[self.slot] = 0


class RingBatch:
    """A batch in a ring slot; pickles as (token, slot, layout) and unpickles, in the process that
    owns the ring, as the Batch."""

    def __init__(self, token, slot: int, layout: list, ids: list, dtype: torch.dtype):
        self.token, self.slot, self.layout, self.ids, self.dtype = token, slot, layout, ids, dtype

    def __reduce__(self):
        return _open, (self.token, self.slot, self.layout, self.ids, self.dtype)


def _open(token, slot, layout, ids, dtype):
    ring = _RINGS.get(token)
    if ring is None or ring.owner != os.getpid():
        raise RuntimeError(f"a batch in shared slot {slot} of loader {token} reached process "
                           f"{os.getpid()}, which does not own it: batches from a GraphLoader's "
                           "workers are read only by the process that iterates the loader")
    v = ring.open(slot, layout)
    return make_batch({k: torch.from_numpy(x) for k, x in v.items()}, ids)
