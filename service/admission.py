"""Admission, in one object: who may enter (ready, not draining), whether there is room (requests in
flight, rows queued, the event loop's lateness) and by when a request must be answered (its deadline).

The outer ASGI layer asks :meth:`Admission.shed_reason` before routing and before the body is read;
the service asks :meth:`Admission.check` when a route acquires the model; the batcher, which owns the
queue, refuses with the same :func:`queue_full` error when rows do not fit. Where the queue lives is
hidden behind ``room()`` -> (rows queued, queue size), so the same rule holds whoever owns the queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping

from contract.errors import NotReady, QueueFull
from service.loop_lag import LoopLag

DEADLINE = "mtserve.deadline"  # ASGI scope key: the request's deadline (time.monotonic())
LAG_FRACTION = 0.02  # shed while the event loop is late by more than this share of timeout_ms,
LAG_FLOOR_S = 0.1  # and by more than this (at saturation, not overloaded, it runs up to ~50 ms late)

Room = Callable[[], tuple[int, int]]  # () -> (rows queued, queue size)


def queue_full(queued: int, size: int) -> QueueFull:
    """The one 429 for a full queue (with ``Retry-After``)."""
    return QueueFull(f"queue full ({queued} of {size} rows waiting, the limit); retry later")


class Admission:
    """Readiness, room and deadlines of one server process."""

    def __init__(self, timeout_ms: float, max_inflight: int, room: Room, lag: LoopLag | None = None):
        self.timeout_s = timeout_ms / 1000.0
        self.max_inflight = max_inflight
        self.max_lag = max(LAG_FLOOR_S, LAG_FRACTION * self.timeout_s)
        self.room = room
        self.lag = lag or LoopLag()
        self.inflight = 0  # inference requests admitted by the outer layer, not answered yet
        self.ready = False
        self.draining = False
        self.failed: str | None = None  # why the model could not start

    def not_ready(self) -> str | None:
        """Why nothing may be admitted now (503), or None."""
        if self.draining:
            return "the server is shutting down"
        if not self.ready:
            return self.failed or "the model is loading"
        return None

    def check_ready(self) -> None:
        """503 unless ready and not draining."""
        if (reason := self.not_ready()) is not None:
            raise NotReady(reason)

    def check(self, rows: int = 1) -> None:
        """503 when not ready or draining; 429 when ``rows`` more rows would not fit in the queue."""
        self.check_ready()
        queued, size = self.room()
        if queued + rows > size:
            raise queue_full(queued, size)

    def shed_reason(self, now: float) -> str | None:
        """Why a new inference request must be turned away now (429), or None. A server that is not
        ready is not shed: the route answers 503."""
        if self.not_ready() is not None:
            return None
        if self.inflight >= self.max_inflight:
            return f"overloaded: {self.max_inflight} requests in flight, the limit; retry later"
        queued, size = self.room()
        if queued >= size:
            return queue_full(queued, size).message
        if self.lag.current(now) > self.max_lag:
            return f"overloaded: the event loop is over {self.max_lag * 1e3:.0f} ms behind; retry later"
        return None

    def deadline(self, scope: MutableMapping | None = None) -> float:
        """The request's deadline (``time.monotonic()``): ``timeout_ms`` after it reached the outer
        layer (which stamps it in the ASGI scope and answers 504 then), else from now."""
        if scope is not None and DEADLINE in scope:
            return scope[DEADLINE]
        return time.monotonic() + self.timeout_s
