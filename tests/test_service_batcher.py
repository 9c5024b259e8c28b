"""The batch collector (a pure function on plain queues) and the Batcher loop on a fake engine."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque

import numpy as np
import pytest

from contract.errors import ClientClosed, DeadlineExceeded, NotReady, QueueFull
from service.batcher import Batcher
from service.client_watch import awaiting
from service.schedule import Job, collect
from tests.fakes import FakeEngine

TASKS = ["digits", "animals", "shapes"]


def rows(n: int, value: float = 0.0) -> np.ndarray:
    return np.full((n, 3, 32, 32), value, dtype=np.float32)


# -- collect(): plain queues, no event loop running ---------------------------------------------
class _Future:
    def __init__(self, done: bool = False):
        self._done = done

    def done(self) -> bool:
        return self._done


def job(task: str, n: int = 1, deadline: float = 1e18, cancelled: bool = False) -> Job:
    return Job(task, rows(n), _Future(cancelled), deadline)  # type: ignore[arg-type]


def queues(pending: dict[str, list[int]], **kw) -> dict[str, deque[Job]]:
    return {t: deque(job(t, n, **kw) for n in pending.get(t, [])) for t in TASKS}


def per_task(batch) -> Counter:
    return Counter({t: 0 for t in TASKS}) + Counter(batch.tasks)


def max_min_fair(pending: dict[str, int], capacity: int) -> dict[str, int]:
    """Reference water-filling: the largest level L with sum(min(p, L)) <= capacity, then remainders."""
    alloc = dict.fromkeys(pending, 0)
    left = capacity
    while left > 0 and any(alloc[t] < pending[t] for t in pending):
        active = [t for t in pending if alloc[t] < pending[t]]
        q = max(1, left // len(active))
        for t in active:
            take = min(q, pending[t] - alloc[t], left)
            alloc[t] += take
            left -= take
    return alloc


@pytest.mark.parametrize("max_rows", [1, 3, 8, 32])
def test_flush_at_size(max_rows):
    q = queues({"digits": [1] * 40})
    batch = collect(q, max_rows, now=0.0)
    assert batch.rows == max_rows
    assert sum(j.left for j in q["digits"]) == 40 - max_rows


@pytest.mark.parametrize("max_rows", [4, 8, 16, 64])
@pytest.mark.parametrize("pending", [(100, 2, 1), (50, 50, 50), (7, 0, 30), (1, 1, 1)])
def test_fair_shares_across_tasks(max_rows, pending):
    """A flood on one task cannot starve another: shares are max-min fair (sizes differ by <= 1)."""
    q = queues({t: [1] * n for t, n in zip(TASKS, pending, strict=True)})
    got = per_task(collect(q, max_rows, now=0.0))
    want = max_min_fair(dict(zip(TASKS, pending, strict=True)), max_rows)
    assert sum(got.values()) == sum(want.values())
    for t in TASKS:
        assert abs(got[t] - want[t]) <= 1, (got, want)


def test_rotating_start_spreads_the_remainder():
    q = queues({t: [1] * 30 for t in TASKS})
    totals = Counter()
    for start in range(3):
        totals += Counter(collect(q, 4, now=0.0, start=start).tasks)
    assert set(totals.values()) == {4}


@pytest.mark.parametrize("max_rows", [3, 4, 7])
def test_large_request_is_split_across_batches(max_rows):
    q = queues({"shapes": [10]})
    (j,) = q["shapes"]
    seen = []
    while q["shapes"]:
        batch = collect(q, max_rows, now=0.0)
        seen += [(a, b) for _, a, b in batch.slices]
    assert seen[0] == (0, max_rows) and seen[-1][1] == 10
    assert sum(b - a for a, b in seen) == 10 and j.taken == 10


def test_expired_and_cancelled_jobs_are_dropped_uncomputed():
    q = {t: deque() for t in TASKS}
    q["digits"] += [job("digits", deadline=5.0), job("digits", cancelled=True), job("digits")]
    batch = collect(q, 8, now=10.0)
    assert len(batch.expired) == 1 and len(batch.skipped) == 1
    assert batch.rows == 1 and batch.slices[0][0] not in batch.expired + batch.skipped


def test_per_task_mode_never_mixes():
    q = queues({t: [1] * 5 for t in TASKS})
    for start in range(6):
        batch = collect(q, 4, now=0.0, start=start, per_task=True)
        assert len(set(batch.tasks)) <= 1


# -- the Batcher loop ------------------------------------------------------------------------------
def make(engine: FakeEngine | None = None, **kw) -> tuple[Batcher, FakeEngine]:
    engine = engine or FakeEngine()
    engine.start()
    b = Batcher(engine, TASKS, **kw)
    b.start()
    return b, engine


def far() -> float:
    return time.monotonic() + 60


@pytest.mark.parametrize("max_batch_size", [1, 3, 8])
async def test_loop_flushes_at_size(max_batch_size):
    b, engine = make(max_batch_size=max_batch_size, max_wait_ms=10_000)
    t0 = time.monotonic()
    jobs = [b.submit("digits", rows(1), far()) for _ in range(max_batch_size)]
    await asyncio.wait_for(asyncio.gather(*(b.wait(j) for j in jobs)), 5)
    assert time.monotonic() - t0 < 5
    assert [len(c) for c in engine.calls] == [max_batch_size]
    await b.stop()


async def until(cond, limit: float = 5.0) -> None:
    """Poll ``cond()`` on the event loop until it holds (fails after ``limit`` s)."""
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "condition never held"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("max_wait_ms", [20, 80])
async def test_loop_flushes_at_timeout(max_wait_ms):
    """max_wait_ms applies to rows that arrived while a batch was running: when the engine finishes,
    a partial batch of such rows goes once its oldest row has waited max_wait_ms, not before (the
    lower bound is the assertion; nothing here bounds how late it may go)."""
    b, engine = make(max_batch_size=32, max_wait_ms=max_wait_ms)
    engine.gate.clear()
    first = b.submit("digits", rows(1), far())
    await until(lambda: b.queued_rows == 0)  # taken, blocked in the engine
    t0 = time.monotonic()
    job = b.submit("shapes", rows(2), far())
    engine.gate.set()  # the engine finishes at once; the partial batch still waits for max_wait
    await asyncio.wait_for(b.wait(first), 5)
    out = await asyncio.wait_for(b.wait(job), 5)
    assert time.monotonic() - t0 >= max_wait_ms / 1000 * 0.9
    assert len(out) == 2 and out[0].shape == (4,)
    assert [len(c) for c in engine.calls] == [1, 2]
    await b.stop()


@pytest.mark.parametrize("rows_in_request", [1, 3])
async def test_idle_engine_dispatches_at_once(rows_in_request):
    """An idle engine takes a lone request at once: max_wait_ms (here 10,000 ms) never delays it."""
    b, engine = make(max_batch_size=32, max_wait_ms=10_000)
    for task in TASKS:  # each one reaches an idle engine (the previous one has been answered)
        out = await asyncio.wait_for(b.wait(b.submit(task, rows(rows_in_request), far())), 5)
        assert len(out) == rows_in_request
    assert [len(c) for c in engine.calls] == [rows_in_request] * len(TASKS)
    await b.stop()


async def test_idle_engine_does_not_wait_for_the_batch_to_fill():
    """The collector's gate (Batcher._fill) returns at once for rows that reached an idle engine,
    and waits (here: a 10 s max_wait) for rows that arrived while a batch was running."""
    b = Batcher(FakeEngine(), TASKS, max_batch_size=32, max_wait_ms=10_000)  # loop not started
    b.submit("digits", rows(1), far())
    await asyncio.wait_for(b._fill(), 1)  # idle: returns without waiting
    b._free_since = time.monotonic() + 1  # as if the engine had been busy when that row arrived
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(b._fill(), 0.05)


async def test_a_gate_given_up_leaves_no_timer_to_wake_the_batcher_later():
    """The max_wait timer of a ``_fill`` that is cancelled (e.g. the batcher stopping) is cancelled
    with it: nothing sets the wake-up event afterwards."""
    b = Batcher(FakeEngine(), TASKS, max_batch_size=32, max_wait_ms=30)  # loop not started
    b.submit("digits", rows(1), far())
    b._free_since = time.monotonic() + 1  # the row arrived while the engine was busy: a timed wait
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(b._fill(), 0.005)
    b._wakeup.clear()
    await asyncio.sleep(0.08)  # past the 30 ms the timer was armed for
    assert not b._wakeup.is_set()


def test_a_gathering_wait_below_uvloops_timer_tick_wakes_the_batcher_once():
    """uvloop's timers count whole milliseconds: a wait of 0.3 ms is a timer due at once. The gate
    goes when its timer fires instead of arming another for what is left (which spun the loop about
    90 times for 0.4 ms, after most batches under load)."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> int:
        b = Batcher(FakeEngine(), TASKS, max_batch_size=32, max_wait_ms=2.0)  # loop not started
        b.submit("digits", rows(1), far())
        b._free_since = time.monotonic() + 1  # the row arrived while the engine was busy
        b.queues["digits"][0].enqueued = time.monotonic() - 0.0017  # 0.3 ms of its 2 ms left
        wakes = 0
        wakeup_set = b._wakeup.set

        def counted() -> None:
            nonlocal wakes
            wakes += 1
            wakeup_set()

        b._wakeup.set = counted  # type: ignore[method-assign]
        await asyncio.wait_for(b._fill(), 1)
        b.executor.shutdown()
        return wakes

    assert uvloop.run(scenario()) == 1


@pytest.mark.parametrize("max_batch_size", [4, 8])
async def test_loop_is_fair_under_a_flood(max_batch_size):
    b, engine = make(max_batch_size=max_batch_size, max_wait_ms=50)
    flood = [b.submit("digits", rows(1), far()) for _ in range(50)]
    others = [b.submit("animals", rows(1), far()), b.submit("shapes", rows(1), far())]
    await asyncio.wait_for(asyncio.gather(*(b.wait(j) for j in others)), 5)
    assert {"animals", "shapes"} <= set(engine.calls[0])  # in the very first batch
    await asyncio.gather(*(b.wait(j) for j in flood))
    await b.stop()


async def test_deadline_answers_504_and_never_computes():
    b, engine = make(max_batch_size=1, max_wait_ms=0)
    engine.gate.clear()
    first = b.submit("digits", rows(1), far())
    await asyncio.sleep(0.05)  # the loop takes it and blocks in the engine
    late = b.submit("shapes", rows(1, 9.0), time.monotonic() + 0.05)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(b.wait(late), 5)
    engine.gate.set()
    await b.wait(first)
    await b.stop()
    assert all("shapes" not in c for c in engine.calls)


async def test_deadline_while_computing_answers_504_at_the_deadline():
    """A job whose batch is computing when its deadline passes answers 504 then, not when the batch
    finishes (the batch runs to its end; the job's rows are dropped)."""
    b, engine = make(max_batch_size=1, max_wait_ms=0)
    engine.gate.clear()
    t0 = time.monotonic()
    computing = b.submit("digits", rows(1), t0 + 0.1)
    with pytest.raises(DeadlineExceeded, match="computing"):
        await asyncio.wait_for(b.wait(computing), 5)
    assert time.monotonic() - t0 < 1.0  # the engine is still blocked
    engine.gate.set()
    await b.stop()
    assert engine.calls == [["digits"]]


async def test_deadline_checked_by_the_collector_too():
    b, engine = make(max_batch_size=1, max_wait_ms=0)
    engine.gate.clear()
    first = b.submit("digits", rows(1), far())
    await asyncio.sleep(0.05)
    late = b.submit("shapes", rows(1), time.monotonic() + 0.01)  # nobody waits on it
    await asyncio.sleep(0.05)
    engine.gate.set()
    await b.wait(first)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(late.future, 5)
    await b.stop()
    assert all("shapes" not in c for c in engine.calls)


async def test_client_that_left_is_skipped():
    b, engine = make(max_batch_size=1, max_wait_ms=0)
    engine.gate.clear()
    first = b.submit("digits", rows(1), far())
    await asyncio.sleep(0.05)
    gone = asyncio.Event()
    leaving = b.submit("animals", rows(1), far())
    waiter = asyncio.ensure_future(b.wait(leaving, awaiting(gone.wait())))
    await asyncio.sleep(0.01)
    gone.set()
    with pytest.raises(ClientClosed):
        await asyncio.wait_for(waiter, 5)
    engine.gate.set()
    await b.wait(first)
    await b.stop()
    assert all("animals" not in c for c in engine.calls)
    assert b.queued_rows == 0


@pytest.mark.parametrize("queue_size", [1, 5])
async def test_queue_full_is_429_at_once(queue_size):
    b, engine = make(max_batch_size=1, max_wait_ms=0, queue_size=queue_size)
    engine.gate.clear()
    b.submit("digits", rows(1), far())
    await asyncio.sleep(0.05)  # taken by the loop, blocked in the engine: no longer queued
    for _ in range(queue_size):
        b.submit("digits", rows(1), far())
    with pytest.raises(QueueFull) as exc:
        b.submit("digits", rows(1), far())
    assert exc.value.headers["Retry-After"].isdigit()
    engine.gate.set()
    await b.stop()


async def test_stop_finishes_admitted_jobs_and_refuses_new_ones():
    b, engine = make(engine=FakeEngine(delay=0.01), max_batch_size=2, max_wait_ms=1)
    jobs = [b.submit(TASKS[i % 3], rows(1, i), far()) for i in range(9)]
    waits = [asyncio.ensure_future(b.wait(j)) for j in jobs]
    await b.stop()
    assert all(j.future.done() for j in jobs)
    assert len(await asyncio.wait_for(asyncio.gather(*waits), 1)) == 9
    assert sum(map(len, engine.calls)) == 9
    with pytest.raises(NotReady):
        b.submit("digits", rows(1), far())


async def test_engine_failure_fails_the_batch_not_the_loop():
    b, engine = make(max_batch_size=4, max_wait_ms=0)
    engine.fail_next = True
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(b.wait(b.submit("digits", rows(1), far())), 5)
    out = await asyncio.wait_for(b.wait(b.submit("digits", rows(1), far())), 5)
    assert len(out) == 1
    await b.stop()


async def test_rows_come_back_to_their_own_request():
    b, engine = make(max_batch_size=8, max_wait_ms=20)
    jobs = [(t, v, b.submit(t, rows(3, v), far())) for v, t in enumerate(TASKS * 4)]
    results = await asyncio.gather(*(b.wait(j) for _, _, j in jobs))
    from tests.fakes import fake_logits

    for (t, v, _), probs in zip(jobs, results, strict=True):
        z = fake_logits(rows(1, v)[0], t, len(probs[0]))
        want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        assert all(np.allclose(p, want, atol=1e-6) for p in probs)
    assert max(len(set(c)) for c in engine.calls) > 1  # some batch mixed tasks
    await b.stop()


async def test_a_batch_reaches_the_engine_in_its_row_order_and_rows_still_come_back_to_their_own():
    """An engine with ``row_order`` gets each batch's rows sorted by it (stable: a task's requests in
    their fair order), so it computes them without reordering them (a copy of the batch on the device
    paths); every request still gets its own rows back."""
    from tests.fakes import fake_logits

    b, engine = make(max_batch_size=12, max_wait_ms=20)
    engine.row_order = {"shapes": 0, "digits": 1, "animals": 2}
    jobs = [(t, v, b.submit(t, rows(1, v), far())) for v, t in enumerate(TASKS * 4)]
    results = await asyncio.gather(*(b.wait(j) for _, _, j in jobs))
    for (t, v, _), probs in zip(jobs, results, strict=True):
        z = fake_logits(rows(1, v)[0], t, len(probs[0]))
        assert np.allclose(probs[0], np.exp(z - z.max()) / np.exp(z - z.max()).sum(), atol=1e-6)
    mixed = [c for c in engine.calls if len(set(c)) > 1]
    assert mixed and all(c == sorted(c, key=engine.row_order.__getitem__) for c in engine.calls)
    for call, x in zip(engine.calls, engine.rows_seen, strict=True):  # within a task: arrival order
        for task in set(call):
            values = [float(x[i].mean()) for i, t in enumerate(call) if t == task]
            assert values == sorted(values)
    await b.stop()


async def test_rows_keep_gathering_while_the_engine_is_busy():
    """Past max_wait, a partial batch still waits for the engine to be free (Triton-style): no
    small batches queued behind a busy engine; a full batch goes at once."""
    b, engine = make(max_batch_size=8, max_wait_ms=5)
    engine.gate.clear()
    first = b.submit("digits", rows(1), far())
    await asyncio.sleep(0.05)
    later = []
    for t in TASKS:
        later.append(b.submit(t, rows(1), far()))
        await asyncio.sleep(0.02)  # each one older than max_wait
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(*(b.wait(j) for j in [first, *later])), 5)
    assert [len(c) for c in engine.calls] == [1, 3]
    await b.stop()


async def test_admission_rejects_before_the_body_is_read_and_submit_agrees():
    """Admission.check over the batcher's room: 429 (with Retry-After) as soon as the queue cannot
    take one more row, the same error submit gives with the real row count; 503 when draining."""
    from service.admission import Admission

    b, engine = make(max_batch_size=1, max_wait_ms=0, queue_size=2)
    adm = Admission(1000, 100, lambda: (b.queued_rows, b.queue_size))
    adm.ready = True
    engine.gate.clear()
    b.submit("digits", rows(1), far())
    await until(lambda: b.queued_rows == 0)  # running, no longer queued
    adm.check()
    b.submit("digits", rows(2), far())
    with pytest.raises(QueueFull) as exc:
        adm.check()
    with pytest.raises(QueueFull) as again:
        b.submit("digits", rows(1), far())
    assert exc.value.headers["Retry-After"].isdigit() and exc.value.message == again.value.message
    assert b.queued_rows == 2
    engine.gate.set()
    await b.stop()
    adm.draining = True
    with pytest.raises(NotReady):
        adm.check()


async def test_segment_metrics_are_observed_on_the_loop_after_the_rows_are_delivered():
    """The segments' runs of a batch reach the observer on the event loop's thread (where the metric
    buffer batches them), once the batch's requests have their rows."""
    import threading

    seen: list[tuple[int, list[str], bool]] = []
    jobs = []

    def observe(runs) -> None:
        seen.append((threading.get_ident(), [r.segment for r in runs], all(j.future.done() for j in jobs)))

    b, engine = make(max_batch_size=4, max_wait_ms=0, observe_segments=observe)
    jobs += [b.submit(t, rows(1), far()) for t in TASKS]
    await asyncio.wait_for(asyncio.gather(*(b.wait(j) for j in jobs)), 5)
    await until(lambda: len(seen) == len(engine.calls))
    assert seen and all(tid == threading.get_ident() for tid, _, _ in seen)
    assert all(segments == [s.name for s in engine.manifest.segments] for _, segments, _ in seen)
    assert seen[-1][2]  # the rows were delivered first
    await b.stop()
