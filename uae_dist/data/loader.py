"""``GraphLoader``: torch's DataLoader for the graph data sets; workers hand batches over in shared
memory."""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import sys

import numpy as np
from torch.utils.data import DataLoader

from . import ring as R
from .dataset import collate
from .workers import SlotWorkersIter

HEADROOM = 1.25  # slot size over the largest batch of the epoch it was sized for
# glibc mallopt: keep freed memory in the worker's heap (a batch's arrays are megabytes: mapped
# fresh and page-faulted at every batch otherwise, 40 % of a worker's time at 8 Å)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


class _WorkerInit:
    """Tunes a worker's malloc, then runs the caller's ``worker_init_fn`` (picklable, for spawn)."""

    def __init__(self, fn=None):
        self.fn = fn

    def __call__(self, worker_id: int):
        libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # glibc's symbols
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest
        if self.fn is not None:
            self.fn(worker_id)


class GraphLoader(DataLoader):
    """A DataLoader over a ``CrystalGraphDataset`` (or a view of one with ``natoms``, ``nedges``
    and ``target_names``) and a batch sampler, collating with :func:`~.dataset.collate`.

    With worker processes forked (the default on Linux), each iteration hands the workers a
    :class:`~.ring.BatchRing` of ``slots_per_worker`` slots per worker (default: the prefetch
    depth + 3: the batches in flight, the one in use and the one before it), sized for the
    largest batch of the epoch's plan (``batch_sampler`` as a list, or with a ``plan()`` such as
    ``DistributedAtomBatchSampler``). Otherwise, and for any batch that does not fit, it is a
    plain DataLoader with ``collate``: the same batches either way. With fork, no pinned memory and
    no persistent workers, the workers are the loader's own (:mod:`.workers`: a pipe per worker
    instead of torch's queues); otherwise torch's. Workers keep freed memory in their heap (glibc
    ``mallopt``) before any ``worker_init_fn`` runs."""

    def __init__(self, dataset, batch_sampler, *, num_workers: int = 0,
                 slots_per_worker: int | None = None, **kw):
        kw.setdefault("collate_fn", collate)
        if num_workers > 0:
            kw["worker_init_fn"] = _WorkerInit(kw.get("worker_init_fn"))
        super().__init__(dataset, batch_sampler=batch_sampler, num_workers=num_workers, **kw)
        self.slots_per_worker = slots_per_worker
        self._ring = None

    def __iter__(self):
        reused = self.persistent_workers and self._iterator is not None
        forks = self.num_workers > 0 and not reused
        ring = self._ring_for_epoch() if forks else None
        if ring is None:
            return super().__iter__()
        ring.reset()
        if self._own_workers():
            return SlotWorkersIter(self, list(self.batch_sampler), ring)
        R._FORKING = ring  # the workers forked next inherit it
        try:
            it = super().__iter__()
        finally:
            R._FORKING = None
        it._uae_ring = ring  # alive while the iterator is, even if the loader is not
        return it

    def _own_workers(self) -> bool:
        """Our own forked workers (:mod:`.workers`) unless something asks for torch's: pinned
        memory (its pin thread), persistent workers, a start method other than fork."""
        ctx = self.multiprocessing_context
        method = ctx.get_start_method() if ctx is not None else mp.get_start_method()
        return method == "fork" and not self.pin_memory and not self.persistent_workers

    def _ring_for_epoch(self):
        bs = self.batch_sampler
        plan = bs if isinstance(bs, (list, tuple)) else bs.plan() if hasattr(bs, "plan") else None
        ds = self.dataset
        if not plan or not all(hasattr(ds, a) for a in ("natoms", "nedges", "target_names")):
            return None
        sizes = np.array([len(b) for b in plan])
        flat = np.concatenate([np.asarray(b, dtype=np.int64) for b in plan])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        atoms = np.add.reduceat(np.asarray(ds.natoms)[flat], starts)
        edges = np.add.reduceat(np.asarray(ds.nedges)[flat], starts)
        need = int(R.batch_bytes(atoms, edges, sizes, len(ds.target_names), 8).max())
        per_worker = self.slots_per_worker or (self.prefetch_factor or 2) + 3
        r = self._ring
        if r is None or r.slot_bytes < need or r.workers != self.num_workers \
                or r.per_worker != per_worker:
            self._ring = R.BatchRing(self.num_workers, per_worker, int(need * HEADROOM))
        return self._ring
