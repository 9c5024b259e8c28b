"""service/engine_thread.py: the device's one thread (the batcher's hand-over without an executor future)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.engine_thread import EngineThread


def test_work_runs_in_order_on_one_named_thread_and_completions_get_result_or_error():
    thread = EngineThread(name="mtserve-engine-test")
    seen: list = []

    def work(i: int) -> int:
        if i == 3:
            raise ValueError("bad batch")
        time.sleep(0.001 * (5 - i))  # later items are quicker: order must not depend on it
        return i * 10

    def done(result, error):
        seen.append((threading.current_thread().name, result, type(error).__name__ if error else None))

    for i in range(5):
        thread.call(work, i, done)
    thread.shutdown(wait=True)
    assert [r for _, r, _ in seen] == [0, 10, 20, None, 40]
    assert seen[3][2] == "ValueError"
    assert {name for name, _, _ in seen} == {"mtserve-engine-test"}
    assert not thread.alive


def test_shutdown_finishes_what_was_handed_over_and_refuses_more():
    thread = EngineThread()
    gate = threading.Event()
    out: list[int] = []
    thread.call(lambda _: gate.wait(5), None, lambda r, e: out.append(1))
    thread.call(lambda _: None, None, lambda r, e: out.append(2))
    threading.Timer(0.05, gate.set).start()
    thread.shutdown(wait=True)
    assert out == [1, 2]
    with pytest.raises(RuntimeError):
        thread.call(lambda _: None, None, lambda r, e: None)


def test_a_failing_completion_callback_does_not_end_the_thread():
    thread = EngineThread()
    out: list[int] = []

    def broken(result, error):
        raise RuntimeError("the loop is closed")

    thread.call(lambda _: 1, None, broken)
    thread.call(lambda _: 2, None, lambda r, e: out.append(r))
    thread.shutdown(wait=True)
    assert out == [2]


def test_submit_serves_run_in_executor():
    thread = EngineThread()

    async def main():
        loop = asyncio.get_running_loop()
        name = await loop.run_in_executor(thread, lambda: threading.current_thread().name)
        with pytest.raises(ZeroDivisionError):
            await loop.run_in_executor(thread, lambda: 1 / 0)
        return name

    assert asyncio.run(main()) == "mtserve-engine"
    thread.shutdown()


def test_the_process_holding_the_engine_shortens_the_gil_switch_interval():
    """``--gil-switch-ms`` (default 0.5, Python's own is 5): flag -> setting -> sys.setswitchinterval."""
    import argparse
    import sys

    from service.engine_thread import favour_engine_thread
    from service.serve_cli import add_arguments, settings_from

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings_from(parser.parse_args(["b"])).gil_switch_ms == 0.5
    given = settings_from(parser.parse_args(["b", "--gil-switch-ms", "1.5"]))
    before = sys.getswitchinterval()
    try:
        favour_engine_thread(given.gil_switch_ms)
        assert sys.getswitchinterval() == pytest.approx(0.0015)
    finally:
        sys.setswitchinterval(before)
    with pytest.raises(ValueError, match="gil_switch_ms"):
        settings_from(parser.parse_args(["b", "--gil-switch-ms", "0"]))
