"""How late the event loop runs: the outer layer sheds load when it runs too late."""

from __future__ import annotations

import asyncio
import time


class LoopLag:
    """How late the event loop runs, from a periodic timer (``interval`` s): how late it fired. Costs
    one callback per interval."""

    def __init__(self, interval: float = 0.025):
        self.interval = interval
        self.lag = 0.0  # lateness of the last tick (s)
        self.previous = 0.0  # lateness of the tick before it
        self._due: float | None = None  # time.monotonic() the next tick is due
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._handle is None:
            self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle, self._due, self.lag, self.previous = None, None, 0.0, 0.0

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = time.monotonic() + self.interval
        self._handle = loop.call_later(self.interval, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.previous, self.lag = self.lag, max(0.0, time.monotonic() - self._due)  # type: ignore[operator]
        self._schedule(loop)

    def current(self, now: float) -> float:
        """The lag now: how overdue the pending tick is (the loop is behind right now), else the
        smaller lateness of the last two ticks. One late tick alone (a garbage collection, a thread
        holding the GIL while a reload verifies a bundle) is a stall that is over, not overload; two
        in a row are."""
        sustained = min(self.lag, self.previous)
        return sustained if self._due is None else max(sustained, now - self._due)
