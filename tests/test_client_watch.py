"""The client watch: uvicorn's disconnected flag probed by one sweep, a watcher task elsewhere."""

from __future__ import annotations

import asyncio

from service.client_watch import ClientWatch, awaiting, uvicorn_probe


class Cycle:
    """Shaped like uvicorn's RequestResponseCycle: ``receive`` is its method, ``disconnected`` a flag."""

    def __init__(self):
        self.disconnected = False
        self.gone = asyncio.Event()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}


def test_probe_unwraps_the_outer_layer_and_reads_the_flag():
    cycle = Cycle()

    async def limited():  # the outer layer's wrapper of receive
        return await cycle.receive()

    limited.inner = cycle.receive
    probe = uvicorn_probe(limited)
    assert probe is not None and probe() is False
    cycle.disconnected = True
    assert probe() is True


def test_no_probe_for_another_server():
    async def receive():
        return {"type": "http.request"}

    assert uvicorn_probe(receive) is None

    class NotUvicorn:
        disconnected = None  # not a flag

        async def receive(self):
            return {}

    assert uvicorn_probe(NotUvicorn().receive) is None


async def test_sweep_calls_back_once_for_a_client_that_left_and_never_after_stop():
    watch = ClientWatch(interval=0.005)
    left, stays, answered = Cycle(), Cycle(), Cycle()
    calls: list[str] = []
    watch.leaving(left.receive)(lambda: calls.append("left"))
    watch.leaving(stays.receive)(lambda: calls.append("stays"))
    stop = watch.leaving(answered.receive)(lambda: calls.append("answered"))
    stop()  # answered before its client left
    answered.disconnected = True
    left.disconnected = True
    await asyncio.sleep(0.05)
    assert calls == ["left"]
    assert len(watch) == 1  # the one still waiting
    stays.disconnected = True
    await asyncio.sleep(0.05)
    assert calls == ["left", "stays"] and len(watch) == 0
    assert watch._handle is None  # no timer while nothing is watched


async def test_a_failing_callback_does_not_stop_the_sweep():
    watch = ClientWatch(interval=0.005)
    a, b = Cycle(), Cycle()
    calls: list[str] = []

    def boom():
        raise RuntimeError("bug")

    watch.leaving(a.receive)(boom)
    watch.leaving(b.receive)(lambda: calls.append("b"))
    a.disconnected = b.disconnected = True
    await asyncio.sleep(0.05)
    assert calls == ["b"]


async def test_fallback_watcher_task_for_another_server():
    watch = ClientWatch()
    gone = asyncio.Event()

    async def receive():
        await gone.wait()
        return {"type": "http.disconnect"}

    calls: list[int] = []
    watch.leaving(receive)(lambda: calls.append(1))
    assert len(watch) == 0  # not probed: a task watches
    gone.set()
    await asyncio.sleep(0.01)
    assert calls == [1]


async def test_awaiting_stopped_first_never_calls_back():
    gone = asyncio.Event()
    calls: list[int] = []
    stop = awaiting(gone.wait())(lambda: calls.append(1))
    stop()
    gone.set()
    await asyncio.sleep(0.01)
    assert calls == []
