"""Per-request metric updates kept on the event loop and applied to prometheus-client in bulk.

A prometheus-client ``Histogram.observe`` takes a lock for the sum and walks the bucket bounds in
Python to take another for one bucket; with the request counter, the request duration, the
preprocessing time and the queue wait that was four locked updates and three bucket walks per
request on the event loop, a few percent of its time per request. :class:`MetricBuffer` appends the
value to a list instead (the loop is one thread: no lock) and applies what gathered in bulk, one
``inc`` per bucket touched and one for the sum, at every scrape of ``/metrics`` (so a scrape sees
everything the process did) and ``interval`` seconds after the first update of a batch (so that
nothing waits long for a scrape).

Updates from another thread (a decode in the pool), and all of them until :meth:`MetricBuffer.bind` is
called, go to prometheus-client directly (``--workers N`` flushes 10 ms after the first update:
see :meth:`service.metrics.Metrics.buffer_on_this_thread`). The bulk update
writes the same values prometheus-client's own ``observe`` would (a test compares the exposition).
"""

from __future__ import annotations

import asyncio
import threading
from bisect import bisect_left
from typing import Any

INTERVAL_S = 0.05


class MetricBuffer:
    """``observe(histogram_child, value)`` and ``inc(counter_child)``, buffered on the loop's thread."""

    def __init__(self, interval: float = INTERVAL_S):
        self.interval = interval
        self._observed: dict[Any, list[float]] = {}
        self._counted: dict[Any, float] = {}
        self._thread: int | None = None
        self._handle: asyncio.TimerHandle | None = None

    def bind(self) -> None:
        """Buffer the updates of the calling thread (the event loop's); others go straight through."""
        self._thread = threading.get_ident()

    def observe(self, child: Any, value: float) -> None:
        if threading.get_ident() != self._thread:
            child.observe(value)
            return
        values = self._observed.get(child)
        if values is None:
            values = self._observed[child] = []
            self._arm()
        values.append(value)

    def inc(self, child: Any, amount: float = 1.0) -> None:
        if threading.get_ident() != self._thread:
            child.inc(amount)
            return
        if child not in self._counted:
            self._counted[child] = amount
            self._arm()
        else:
            self._counted[child] += amount

    def answered(self, counter: Any, histogram: Any, value: float) -> None:
        """``inc(counter)`` and ``observe(histogram, value)``: an answered request's pair."""
        self.inc(counter)
        self.observe(histogram, value)

    def _arm(self) -> None:
        if self._handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a synchronous caller): apply now
                self.flush()
                return
            self._handle = loop.call_later(self.interval, self.flush)

    def flush(self) -> None:
        """Apply everything buffered: per histogram one update of the sum and one per bucket touched."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        observed, self._observed = self._observed, {}
        counted, self._counted = self._counted, {}
        for child, amount in counted.items():
            child.inc(amount)
        for child, values in observed.items():
            apply_observations(child, values)


def apply_observations(child: Any, values: list[float]) -> None:
    """What ``child.observe(v)`` for each ``v`` would leave, in one pass: ``le`` buckets are the first
    bound at or above the value (prometheus-client's rule), and its exposition sums them up."""
    bounds = child._upper_bounds
    counts: dict[int, int] = {}
    for v in values:
        if v == v:  # NaN is in no bucket (every ``v <= bound`` is false), only in the sum
            i = bisect_left(bounds, v)
            counts[i] = counts.get(i, 0) + 1
    child._sum.inc(sum(values))
    for i, n in counts.items():
        child._buckets[i].inc(n)
