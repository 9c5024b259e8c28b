"""Buffered metric updates leave exactly what prometheus-client's own updates leave."""

from __future__ import annotations

import asyncio
import math
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from service.metric_buffer import MetricBuffer

BUCKETS = (0.001, 0.01, 0.1, 1.0)
VALUES = [0.0005, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 1e9, math.nan, 0.0, -1.0]


def text(registry) -> list[str]:
    """The exposition without the ``_created`` timestamps (the two registries differ there)."""
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def pair():
    regs = CollectorRegistry(), CollectorRegistry()
    hists = [Histogram("h", "h", ["task"], buckets=BUCKETS, registry=r) for r in regs]
    counters = [Counter("c", "c", ["task", "code"], registry=r) for r in regs]
    return regs, hists, counters


async def test_bulk_updates_equal_one_by_one_updates_and_flush_on_a_timer():
    regs, (h_direct, h_buf), (c_direct, c_buf) = pair()
    buf = MetricBuffer(interval=0.01)
    buf.bind()
    for v in VALUES:
        h_direct.labels("a").observe(v)
        buf.observe(h_buf.labels("a"), v)
        c_direct.labels("a", "200").inc()
        buf.inc(c_buf.labels("a", "200"))
    assert text(regs[1]) != text(regs[0])  # held back so far
    await asyncio.sleep(0.05)  # the timer applied them
    assert text(regs[1]) == text(regs[0])
    assert buf._handle is None  # no timer while nothing is buffered


def test_flush_applies_at_once_and_other_threads_go_straight_through():
    regs, (h_direct, h_buf), (c_direct, c_buf) = pair()
    buf = MetricBuffer()
    buf.bind()
    for v in VALUES[:4]:
        h_direct.labels("b").observe(v)
    buf.flush()  # nothing buffered: nothing happens

    def elsewhere():  # e.g. a decode in the pool
        for v in VALUES[:4]:
            buf.observe(h_buf.labels("b"), v)

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert text(regs[1]) == text(regs[0])
    c_direct.labels("b", "429").inc(3)
    for _ in range(3):
        buf.inc(c_buf.labels("b", "429"))  # no loop running: applied at once
    assert text(regs[1]) == text(regs[0])


async def test_answered_pairs_equal_one_by_one_updates_on_the_loop_and_elsewhere():
    regs, (h_direct, h_buf), (c_direct, c_buf) = pair()
    buf = MetricBuffer(interval=0.01)
    buf.bind()
    for i, v in enumerate(VALUES):
        code = "200" if i % 3 else "504"
        h_direct.labels("a").observe(v)
        c_direct.labels("a", code).inc()
        buf.answered(c_buf.labels("a", code), h_buf.labels("a"), v)
    assert text(regs[1]) != text(regs[0])  # held back on the loop's thread
    buf.flush()
    assert text(regs[1]) == text(regs[0])

    def elsewhere():  # not the bound thread: straight through
        buf.answered(c_buf.labels("a", "200"), h_buf.labels("a"), 0.2)

    h_direct.labels("a").observe(0.2)
    c_direct.labels("a", "200").inc()
    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert text(regs[1]) == text(regs[0])


async def test_with_workers_updates_reach_the_files_within_the_flush_interval(monkeypatch, tmp_path):
    """``--workers N``: a scrape in another process reads this one's files, so the buffer holds
    updates at most ``MULTIPROCESS_FLUSH_S`` (one process waits up to 50 ms, and its scrape flushes)."""
    from service.metrics import MULTIPROCESS_FLUSH_S, Metrics
    from tests.fakes import fake_manifest

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics = Metrics(fake_manifest(), 8)
    metrics.buffer_on_this_thread()
    task = next(iter(metrics.tasks))
    name = f'mtserve_requests_total{{code="200",task="{task}"}}'
    t0 = time.monotonic()
    metrics.count_request(task, 200, 0.003)
    metrics.observe_queue(task, 0.001)
    await asyncio.sleep(0)
    metrics.count_request(task, 200, 0.003)  # a later turn: the same flush
    assert f"{name} " not in text(metrics.registry)  # held, for the first update's interval
    while f"{name} 2.0" not in text(metrics.registry):
        assert time.monotonic() - t0 < 1.0
        await asyncio.sleep(0.001)
    assert time.monotonic() - t0 >= MULTIPROCESS_FLUSH_S
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    single = Metrics(fake_manifest(), 8)
    single.buffer_on_this_thread()
    assert single.buffer.interval == 0.05  # one process: the scrape flushes, the buffer may wait
