"""Run cells as subprocesses of ``uae-dist finetune``, several at once, each resumable.

Each cell runs ``[launcher…] python -m uae_dist.cli finetune --config BASE overrides…`` in its
own session (Ctrl-C in a terminal reaches only this runner), with ``train.resume=auto``: a cell
that was stopped resumes from its latest checkpoint when it is started again.

* Stopping: SIGTERM, SIGINT, SIGHUP or SIGUSR1 to the runner stops it from starting cells and
  forwards SIGTERM to the running ones, which checkpoint at their next optimizer step and exit;
  a second signal kills them. If the runner itself is killed (SIGKILL), its cells still receive
  SIGTERM (Linux ``PR_SET_PDEATHSIG``) and checkpoint.
* One runner per cell: the runner holds an exclusive ``flock`` on ``<cell>/.lock`` and hands it
  to the cell's process, so the lock lasts while the cell runs, even after the runner died; a
  second runner reports the cell as busy instead of training it twice.
* A failing cell is recorded (exit code, last error line, log path) and the others go on.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import record
from .cells import Resolved

log = logging.getLogger("uae_dist.matrix")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
KILL_GRACE_S = 120.0  # after a timeout's SIGTERM, then SIGKILL


@dataclass
class Outcome:
    """How a cell ended in this run: done | skipped | failed | interrupted | busy."""

    status: str
    resolved: Resolved
    exit_code: int | None = None
    error: str | None = None
    metrics: dict | None = None

    @property
    def log(self) -> Path:
        return self.resolved.dir / record.LOG


@dataclass
class _Job:
    r: Resolved
    base: dict
    units: str | None
    proc: subprocess.Popen
    lock: object
    rec: dict
    deadline: float | None
    signalled: bool = False
    timed_out: bool = False
    killed_at: float | None = None


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the runner dies (Linux), so the cell checkpoints."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def command(r: Resolved, launcher: tuple[str, ...]) -> list[str]:
    """The cell's command; a launcher not on PATH is taken from this interpreter's bin dir (a
    virtual environment that is not activated)."""
    import shutil

    launcher = list(launcher)
    if launcher and shutil.which(launcher[0]) is None:
        here = Path(sys.executable).parent / launcher[0]
        if here.exists():
            launcher[0] = str(here)
    return [*launcher, sys.executable, "-m", "uae_dist.cli", "finetune", *r.args]


def cell_env(threads: int, extra: dict) -> dict:
    import uae_dist

    env = dict(os.environ)
    src = str(Path(uae_dist.__file__).resolve().parents[1])  # the cells run this very code
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def last_error(log_path: Path, n: int = 4000) -> str | None:
    """The most telling line at the end of a cell's log (an error, else the last line)."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - n))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines()]
    except OSError:
        return None
    lines = [ln for ln in lines if ln]
    for ln in reversed(lines):
        if ln.lower().startswith(("error", "config error")) or "Error:" in ln:
            return ln
    return lines[-1] if lines else None


class Runner:
    """Runs a list of resolved cells with at most ``jobs`` at once; ``run()`` returns outcomes."""

    def __init__(self, cells: list[tuple[Resolved, dict, str | None]], jobs: int, threads: int,
                 launcher: tuple[str, ...] = (), timeout_s: float | None = None,
                 env: dict | None = None):
        self.queue = list(cells)  # (resolved, base record, units)
        self.jobs, self.threads, self.launcher = max(1, jobs), threads, tuple(launcher)
        self.timeout_s, self.extra_env = timeout_s, dict(env or {})
        self.running: list[_Job] = []
        self.outcomes: list[Outcome] = []
        self.stopping = 0
        self.total = len(self.queue)

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        self.stopping += 1
        sig = signal.SIGTERM if self.stopping == 1 else signal.SIGKILL
        log.warning("%s: %s %d running cell(s)%s", signal.Signals(signum).name,
                    "checkpointing" if sig == signal.SIGTERM else "killing", len(self.running),
                    "; queued cells are not started" if self.stopping == 1 else "")
        for j in self.running:
            j.signalled = True
            self._signal(j, sig)

    @staticmethod
    def _signal(j: _Job, sig) -> None:
        try:
            os.killpg(j.proc.pid, sig)  # the cell and whatever its launcher started
        except ProcessLookupError:
            pass

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[Outcome]:
        old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            while (self.queue and not self.stopping) or self.running:
                while self.queue and not self.stopping and len(self.running) < self.jobs:
                    self._start(*self.queue.pop(0))
                self._reap()
                time.sleep(0.2)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        for r, base, _ in self.queue:  # never started because of a stop signal
            self.outcomes.append(Outcome("interrupted", r, error="not started (stopped)"))
        return self.outcomes

    def _start(self, r: Resolved, base: dict, units: str | None) -> None:
        r.dir.mkdir(parents=True, exist_ok=True)
        lock = open(r.dir / ".lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            pid = (record.read_json(r.dir / record.CELL) or {}).get("pid")
            self._finish(Outcome("busy", r, error=f"another process (pid {pid}) runs this cell"))
            return
        cmd = command(r, self.launcher)
        with open(r.dir / record.LOG, "a") as fh:
            fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} cell {r.cell.index} "
                     f"{r.cell.name}: {shlex.join(cmd)}\n")
        logf = open(r.dir / record.LOG, "a")
        try:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=cell_env(self.threads,
                                                                           self.extra_env),
                                    start_new_session=True, preexec_fn=_die_with_parent,
                                    pass_fds=(lock.fileno(),))
        except OSError as e:
            logf.close()
            lock.close()
            err = f"could not start {cmd[0]}: {e}"
            record.record_failure(r.dir, base, None, err)
            self._finish(Outcome("failed", r, error=err))
            return
        finally:
            if not logf.closed:
                logf.close()  # the child holds its own descriptor
        rec = record.start_attempt(r.dir, base, cmd, proc.pid)
        deadline = time.time() + self.timeout_s if self.timeout_s else None
        job = _Job(r, base, units, proc, lock, rec, deadline)
        self.running.append(job)
        if self.stopping:  # a signal arrived while this cell was being started
            job.signalled = True
            self._signal(job, signal.SIGTERM)
        log.info("start  [%d] %s  (%d running, %d queued) log %s", r.cell.index, r.cell.name,
                 len(self.running), len(self.queue), r.dir / record.LOG)

    def _reap(self) -> None:
        now = time.time()
        for j in list(self.running):
            if j.deadline and now > j.deadline and not j.timed_out:
                j.timed_out, j.killed_at = True, now
                log.warning("timeout [%d] %s after %.0f s: SIGTERM (checkpoint)", j.r.cell.index,
                            j.r.cell.name, self.timeout_s)
                self._signal(j, signal.SIGTERM)
            elif j.timed_out and now - j.killed_at > KILL_GRACE_S:
                self._signal(j, signal.SIGKILL)
            if j.proc.poll() is None:
                continue
            self.running.remove(j)
            try:
                self._finish(self._outcome(j))
            finally:
                j.lock.close()

    def _outcome(self, j: _Job) -> Outcome:
        r, rc = j.r, j.proc.returncode
        summary = record.read_json(r.dir / "summary.json") or {}
        fresh = (r.dir / "summary.json").exists() and \
            (r.dir / "summary.json").stat().st_mtime >= j.rec["attempts"][-1]["t0"] - 1
        status = summary.get("status") if fresh else None
        if rc == 0 and status == "finished":
            try:
                rec = record.end_attempt(r.dir, j.rec, "finished", rc, None)
                mt = record.collect(r.dir, j.base, r.cell.target, j.units, rec["attempts"])
                record.write_json(r.dir / record.METRICS, mt)
                return Outcome("done", r, rc, metrics=mt)
            except (RuntimeError, KeyError, OSError) as e:
                record.end_attempt(r.dir, j.rec, "failed", rc, str(e))
                return Outcome("failed", r, rc, error=f"finished but unreadable: {e}")
        if j.timed_out:
            err = f"timeout after {self.timeout_s:.0f} s (checkpoint kept: a rerun resumes)"
            record.end_attempt(r.dir, j.rec, "failed", rc, err)
            return Outcome("failed", r, rc, error=err)
        if (rc == 0 and status == "preempted") or j.signalled:
            record.end_attempt(r.dir, j.rec, "interrupted", rc, None)
            return Outcome("interrupted", r, rc, error="stopped by a signal; a rerun resumes")
        err = last_error(r.dir / record.LOG) or "no output"
        if rc == 0:
            err = f"exited 0 without finishing (summary status {status}): {err}"
        record.end_attempt(r.dir, j.rec, "failed", rc, err)
        return Outcome("failed", r, rc, error=err)

    def _eta(self) -> str:
        """Time left at the mean wall time of this run's finished cells, ``jobs`` at once."""
        walls = [o.metrics["wall_time_s"] for o in self.outcomes if o.status == "done"]
        left = self.total - len(self.outcomes)
        if not walls or not left:
            return ""
        s = int(sum(walls) / len(walls) * left / min(self.jobs, left))
        return f", ~{s // 60}m{s % 60:02d}s left"

    def _finish(self, o: Outcome) -> None:
        self.outcomes.append(o)
        k, c = len(self.outcomes), o.resolved.cell
        if o.status == "done":
            t = o.metrics["test"]
            log.info("done   [%d] %s  test MAE %.4g %s, R² %s, %.0f s  (%d/%d%s)", c.index,
                     c.name, t["mae"], o.metrics.get("units") or "", _fmt(t["r2"]),
                     o.metrics["wall_time_s"], k, self.total, self._eta())
        elif o.status == "failed":
            log.error("FAILED [%d] %s  exit %s: %s; log %s  (%d/%d)", c.index, c.name,
                      o.exit_code, o.error, o.log, k, self.total)
        else:
            log.warning("%s [%d] %s  %s  (%d/%d)", o.status, c.index, c.name, o.error or "", k,
                        self.total)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
