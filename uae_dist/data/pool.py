"""Run shard jobs in worker processes, and notice when one dies.

``multiprocessing.Pool`` waits forever for the result of a worker that was killed (the OOM killer,
``kill -9``): it replaces the process and loses the task. Here every shard job gets its own
spawned process and a pipe; the parent waits on the pipes and the process sentinels together, so a
worker that exits without reporting its result fails the build at once, with the shard, the exit
status and the records it was working on, and the other workers are stopped. What the workers had
committed stays: ``--resume`` continues from there.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
from multiprocessing.connection import wait

from .options import BuildError
from .shard import build_shard

_STOP_TIMEOUT_S = 10


def _init_worker() -> None:
    try:  # Linux: die with the parent, so a killed build leaves no writer behind to race --resume
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def _worker(job: dict, conn) -> None:
    _init_worker()
    try:
        stats = build_shard(job, lambda kind, value: conn.send((kind, value)))
    except BaseException as e:  # reported, then a non-zero exit
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise SystemExit(1)
    conn.send(("result", stats))
    conn.close()


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        hint = " (the out-of-memory killer sends this)" if -code == signal.SIGKILL else ""
        return f"killed by signal {-code} ({name}){hint}"
    return f"exited with status {code}"


def run_pool(jobs: list[dict], workers: int, progress) -> list[dict]:
    """Run ``jobs`` (shard jobs) in at most ``workers`` processes; ``progress(n)`` after each
    commit. Returns the shards' stats in job order; raises BuildError when a worker fails."""
    ctx = mp.get_context("spawn")  # no fork: the parent may hold OpenMP threads or lmdb handles
    pending = list(enumerate(jobs))
    running: dict = {}  # connection -> [process, job index, job, last chunk]
    stats: dict[int, dict] = {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                i, job = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker, args=(job, send), daemon=True,
                                name=f"uae-build-shard-{job['shard']}")
                p.start()
                send.close()  # the child holds the only writer: EOF once it is gone
                running[recv] = [p, i, job, None]
            for conn in wait(list(running)):
                p, i, job, chunk = running[conn]
                try:
                    kind, value = conn.recv()
                except EOFError:  # the worker is gone; did it report its result?
                    p.join()
                    del running[conn]
                    conn.close()
                    if i not in stats:
                        raise BuildError(_died(job, p.exitcode, chunk))
                    continue
                if kind == "chunk":
                    running[conn][3] = value
                elif kind == "done":
                    progress(value)
                elif kind == "result":
                    stats[i] = value
                elif kind == "error":
                    raise BuildError(f"shard {job['shard']}: {value}")
    finally:
        _stop([v[0] for v in running.values()])
        for conn in running:
            conn.close()
    return [stats[i] for i in range(len(jobs))]


def _died(job: dict, code, chunk) -> str:
    where = (f" while building the transaction of source records {chunk[0]} to {chunk[1]}"
             if chunk is not None
             else " before it started building records")
    return (f"the build worker of shard {job['shard']} {_exit_status(code)}{where}. Records "
            "committed so far are kept: rerun with --resume to continue (with fewer --workers "
            "if memory is short)")


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()  # committed transactions survive; the open one is rolled back
    for p in procs:
        p.join(_STOP_TIMEOUT_S)
        if p.is_alive():  # pragma: no cover - ignores SIGTERM
            p.kill()
            p.join()
