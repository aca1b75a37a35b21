"""Stop signals that are never lost: a handler records them, our own code acts on them at safe points.

A handler that raises (Python's KeyboardInterrupt) can fire inside a destructor, an at-fork hook or a
finalizer, where Python prints "Exception ignored" and drops the exception: the program then goes on and
finishes as if never told to stop (a preempted merge writing its output and exiting 0). Recorded instead,
the signal is seen by the next :meth:`StopSignals.check`, which raises :class:`Interrupted` from a place
of our choosing, where the cleanup is ordinary code.
"""

from __future__ import annotations

import signal
from typing import Optional


class Interrupted(Exception):
    """A stop signal arrived; raised at a safe point by :meth:`StopSignals.check`."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class StopSignals:
    """``with StopSignals() as stop: ... stop.check() ...``: SIGTERM (a scheduler's preemption) and SIGINT
    (Ctrl-C) are recorded while the block runs, and the previous handlers come back after it. SIGINT stays
    ignored where the parent ignored it (a job started in the background by a shell script). Outside a
    ``with`` block nothing is recorded and :meth:`check` never raises."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "StopSignals":
        for signum in self.SIGNALS:
            previous = signal.getsignal(signum)
            if previous is not signal.SIG_IGN:
                self._previous[signum] = previous
                signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def check(self) -> None:
        """Raise :class:`Interrupted` if a stop signal has arrived."""
        if self.received is not None:
            raise Interrupted(self.received)
