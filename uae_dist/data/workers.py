"""The iterator of a ``GraphLoader`` with forked workers: a batch plan known up front, one pipe per
worker, no index queues.

Why not torch's DataLoader iterator: on 2 cores at 8 Å its main-process machinery (index queues
and their feeder threads, the result queue, reordering, ``record_function``) cost ~0.6 ms a batch
against ~2 ms to load one, and the main process shares the cores with the workers, so 2 workers
were no faster than none. Here the whole epoch's batches are known when iteration starts (the
batch sampler is a list or a sampler iterated once), so worker ``w`` takes batches ``w, w + W,
…`` in order and sends each through its own pipe; the main process reads batch ``k`` from pipe
``k % W``, which keeps the sampler's order with no reordering. A batch travels as a
:class:`~.ring.RingBatch` (slot number and layout: its arrays are already in shared memory) or,
without a free slot, as :class:`~.collated.Packed`.

Flow control as torch's ``prefetch_factor``: a worker holds that many credits (a semaphore) and
spends one per batch; the main process returns it when it receives the batch. Errors in a worker
(a damaged record) arrive in order as torch's ``ExceptionWrapper`` and are raised in the main
process with the worker's traceback; a worker that dies is reported with its exit code. Workers see
``torch.utils.data.get_worker_info()`` and their seeds as under torch's DataLoader.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import weakref
from multiprocessing.connection import wait

import numpy as np
import torch
from torch._utils import ExceptionWrapper
from torch.utils.data._utils import worker as torch_worker
from torch.utils.data._utils.fetch import _MapDatasetFetcher

from . import ring as R

_POLL_S = 5.0  # how often a waiting side checks that the other one is still there


def _work(dataset, batches, wid, nw, conn, credits, stop, init_fn, collate_fn, base_seed, parent):
    """Worker ``wid`` of ``nw``: batches ``wid, wid + nw, …`` of ``batches`` into ``conn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    torch.set_num_threads(1)
    seed = base_seed + wid
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(torch_worker._generate_state(base_seed, wid))
    torch_worker._worker_info = torch_worker.WorkerInfo(id=wid, num_workers=nw, seed=seed,
                                                        dataset=dataset)
    try:
        if init_fn is not None:
            init_fn(wid)
    except Exception:  # noqa: BLE001 - reported to the main process in place of the first batch
        conn.send(ExceptionWrapper(where=f"in GraphLoader worker process {wid}"))
        return
    fetcher = _MapDatasetFetcher(dataset, True, collate_fn, False)  # torch's: __getitems__ first
    try:
        for k in range(wid, len(batches), nw):
            while not credits.acquire(timeout=_POLL_S):
                if os.getppid() != parent:  # the main process is gone
                    return
            if stop.is_set():
                return
            try:
                out = fetcher.fetch(batches[k])
            except Exception:  # noqa: BLE001 - raised in the main process, in order
                out = ExceptionWrapper(where=f"in GraphLoader worker process {wid}")
            conn.send(out)
    except (BrokenPipeError, EOFError, ConnectionResetError):
        return  # the main process closed the iterator


class SlotWorkersIter:
    """Iterates ``batches`` (a list of index lists) of ``loader.dataset`` through ``nw`` forked
    workers that write into ``ring`` (:class:`~.ring.BatchRing`, inherited at fork)."""

    def __init__(self, loader, batches: list, ring):
        self.batches, self._ring, self._k = batches, ring, 0
        nw = loader.num_workers
        ctx = mp.get_context("fork")
        gen = loader.generator
        base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=gen).item())
        self._stop = ctx.Event()
        self._credits = [ctx.Semaphore(loader.prefetch_factor or 2) for _ in range(nw)]
        self._conns, self._procs = [], []
        self._timeout = loader.timeout or None
        R._FORKING = ring  # the workers forked next inherit it
        try:
            for w in range(nw):
                rd, wr = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_work, daemon=True, name=f"uae_graph_worker_{w}",
                                args=(loader.dataset, batches, w, nw, wr, self._credits[w],
                                      self._stop, loader.worker_init_fn, loader.collate_fn,
                                      base_seed, os.getpid()))
                p.start()
                wr.close()
                self._conns.append(rd)
                self._procs.append(p)
        except BaseException:
            _shutdown(self._procs, self._conns, self._credits, self._stop)
            raise
        finally:
            R._FORKING = None
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns,
                                           self._credits, self._stop)

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self.batches)

    def __next__(self):
        if self._k >= len(self.batches) or not self._finalizer.alive:
            self.close()
            raise StopIteration
        w = self._k % len(self._procs)
        conn, proc = self._conns[w], self._procs[w]
        waited = 0.0
        while not conn.poll():
            if wait([conn, proc.sentinel], _POLL_S) == [proc.sentinel] and not conn.poll():
                self.close()
                raise RuntimeError(f"GraphLoader worker {w} (pid {proc.pid}) exited unexpectedly "
                                   f"with exit code {proc.exitcode}: see its messages above")
            waited += _POLL_S
            if self._timeout is not None and waited >= self._timeout:
                self.close()
                raise RuntimeError(f"GraphLoader timed out after {self._timeout} seconds")
        try:
            out = conn.recv()  # a RingBatch unpickles here as the Batch in its slot
        except EOFError:
            self.close()
            raise RuntimeError(f"GraphLoader worker {w} (pid {proc.pid}) closed its pipe "
                               f"before batch {self._k} (exit code {proc.exitcode})") from None
        self._credits[w].release()
        self._k += 1
        if isinstance(out, ExceptionWrapper):
            self.close()
            out.reraise()
        return out

    def close(self) -> None:
        """Stop the workers (also when the iterator is dropped before the end)."""
        self._finalizer()


def _shutdown(procs, conns, credits, stop) -> None:
    stop.set()
    for c in conns:  # a worker blocked sending a batch gets a broken pipe
        c.close()
    for s in credits:  # a worker waiting for a credit wakes, sees stop
        s.release()
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.terminate()
            p.join()
