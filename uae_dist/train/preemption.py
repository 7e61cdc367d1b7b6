"""Pre-emption: SIGTERM/SIGUSR1 (Slurm's warning before a kill) only set a flag; the loop agrees on
it across ranks at the next optimizer step, writes a checkpoint and exits for requeue."""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """``with Preemption() as stop: ... if stop.requested: ...``; handlers are restored on exit."""

    def __init__(self):
        self.requested = False
        self.signum = None
        self._old = {}

    def _handler(self, signum, frame):
        self.requested, self.signum = True, signum

    def __enter__(self) -> "Preemption":
        self._old = {s: signal.signal(s, self._handler) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
