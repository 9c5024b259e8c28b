"""Which clients left while their request waits: one sweep over the requests in flight every few
milliseconds, instead of one watcher task per request.

The ASGI way to learn that a client left is to await ``receive()`` until ``http.disconnect``: one task
per request, created, scheduled, cancelled and torn down again when the answer is ready. Under load
that cost the event loop more than the batcher's whole bookkeeping of the request. uvicorn (the
server `mtserve serve` runs) keeps the answer in a flag: its protocol sets ``disconnected`` on the
request's ``RequestResponseCycle`` when the connection is lost, and ``receive`` is a method of that
cycle. So a request served by uvicorn registers a probe of that flag here (a dict entry), and one timer
sweeps every probe each ``interval``: a client that left is seen within ``interval``, and, as before,
its rows are never computed unless their batch already started. Under any other server (or a test
calling the app in-process) ``receive`` is not uvicorn's, and the request gets the watcher task.

A *leaving* is what the batcher and the engine client take: ``start(on_gone) -> stop``: ``on_gone()``
is called once if the client leaves before ``stop()``.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("mtserve.client_watch")

Stop = Callable[[], None]
Leaving = Callable[[Callable[[], None]], Stop]  # start(on_gone) -> stop
INTERVAL_S = 0.01


def uvicorn_cycle(receive: Any) -> Any | None:
    """``receive`` unwrapped (through ``.inner``, which the outer layer's wrapper sets): if it is a
    method of uvicorn's ``RequestResponseCycle``, that cycle (its ``disconnected`` flag), else None."""
    while (cycle := getattr(receive, "__self__", None)) is None:  # a bound method: uvicorn's, maybe
        if (receive := getattr(receive, "inner", None)) is None:
            return None
    if type(getattr(cycle, "disconnected", None)) is not bool:
        return None
    return cycle


def uvicorn_probe(receive: Any) -> Callable[[], bool] | None:
    """A probe of the ``disconnected`` flag of uvicorn's cycle behind ``receive``, else None."""
    cycle = uvicorn_cycle(receive)
    return None if cycle is None else lambda: cycle.disconnected


def awaiting(disconnected: Awaitable) -> Leaving:
    """A leaving signalled by an awaitable that completes when the client goes away (a watcher task)."""

    def start(on_gone: Callable[[], None]) -> Stop:
        watcher = asyncio.ensure_future(disconnected)

        def done(task: asyncio.Future) -> None:
            if task.cancelled():  # stopped first: the request was answered
                return
            task.exception()  # retrieved: whatever ended the watch, the client is gone
            on_gone()

        watcher.add_done_callback(done)
        return watcher.cancel

    return start


async def receive_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """Completes when ``receive`` says ``http.disconnect`` (or, on some servers, the response is done)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientWatch:
    """The sweep: probes registered per request in flight, checked every ``interval`` seconds while any
    is registered (no timer when idle)."""

    def __init__(self, interval: float = INTERVAL_S):
        self.interval = interval
        self._probes: dict[int, tuple[Any, Callable[[], None]]] = {}  # key -> (cycle, on_gone)
        self._ids = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._probes)

    def leaving(self, receive: Any) -> Leaving:
        """The leaving of the request whose ASGI ``receive`` this is."""
        cycle = uvicorn_cycle(receive)
        if cycle is None:
            return awaiting(receive_disconnect(receive))
        return functools.partial(self.add, cycle)

    def add(self, cycle: Any, on_gone: Callable[[], None]) -> Stop:
        """Watch ``cycle.disconnected``: ``on_gone()`` once it is set, unless the returned stop ran."""
        key = next(self._ids)
        self._probes[key] = (cycle, on_gone)
        loop = asyncio.get_running_loop()
        if self._handle is None or self._loop is not loop:
            self._loop = loop
            self._handle = loop.call_later(self.interval, self._sweep)
        return functools.partial(self._probes.pop, key, None)

    def _sweep(self) -> None:
        gone = [key for key, (cycle, _) in self._probes.items() if cycle.disconnected]
        for key in gone:
            _, on_gone = self._probes.pop(key)
            try:
                on_gone()
            except Exception:  # one callback's bug never stops the sweep
                log.exception("client-left callback failed")
        if self._probes and self._loop is not None:
            self._handle = self._loop.call_later(self.interval, self._sweep)
        else:
            self._handle = None
