"""The scheduler: one owner of the queue, one future per request, one executor thread per device.

A request becomes a :class:`~service.schedule.Job` (its rows, its task, its deadline, its future).
Jobs wait in one FIFO per task; :func:`~service.schedule.collect` (the pure core, service/schedule.py)
forms each batch, max-min fair across tasks, and the jobs whose deadline passed are answered 504
before anything is computed. :class:`Batcher` runs the loop (continuous batching): rows that reach an
idle engine go at once; while a batch runs, the next one gathers rows (queued behind the running
one as soon as it is full); when the engine finishes, they go once the oldest has waited
``max_wait_ms``. Batches run in the device's one thread (service/engine_thread.py); each job gets
its rows back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from contract.errors import ClientClosed, DeadlineExceeded, NotReady
from service.admission import queue_full
from service.client_watch import Leaving
from service.engine_thread import EngineThread
from service.engine_types import Engine, SegmentRun
from service.postprocess import softmax_rows
from service.schedule import Batch, Job, collect

log = logging.getLogger("mtserve.batcher")


Observer = Callable[[Sequence[SegmentRun]], None]


class Batcher:
    """Owns the queue and the device's executor thread; ``submit`` + ``wait`` from the routes."""

    def __init__(
        self,
        engine: Engine,
        tasks: Sequence[str],
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        queue_size: int = 1024,
        per_task: bool = False,
        observe_segments: Observer | None = None,
        observe_queue: Callable[[str, float], None] | None = None,
    ):
        self.engine = engine
        self.queues: dict[str, deque[Job]] = {t: deque() for t in tasks}
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.per_task = per_task
        self.observe_segments = observe_segments
        self.observe_queue = observe_queue
        self._queued_rows = 0
        self.on_queued: Callable[[], None] | None = None  # the engine process publishes the room
        self.executor = EngineThread()  # the device's one thread (also ``run_in_executor``'s)
        self._start = 0
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self._idle = True
        self._free_since = 0.0  # when the engine last finished its work (monotonic)
        self._timed_out = False  # the gathering timer of :meth:`_fill` fired
        self._in_flight: set[asyncio.Future] = set()  # batches handed to the executor, not yet done
        self._lock = threading.Lock()  # Job.started / Job.abandoned, across loop and executor

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @queued_rows.setter
    def queued_rows(self, value: int) -> None:
        self._queued_rows = value
        if self.on_queued is not None:
            self.on_queued()

    # -- admission ----------------------------------------------------------------------------
    def submit(self, task: str, x: np.ndarray, deadline: float) -> Job:
        """Queue a request's rows; 429 at once when the queue is full, 503 when stopping (the owner of
        the queue checks again with the real row count what :class:`Admission` checked earlier)."""
        if self._stopping:
            raise NotReady("the server is shutting down")
        n = int(x.shape[0])
        queued = self._queued_rows
        if queued + n > self.queue_size:
            raise queue_full(queued, self.queue_size)
        job = Job(task, x, asyncio.get_running_loop().create_future(), deadline)
        self.queues[task].append(job)
        self.queued_rows = queued = queued + n
        if self._idle or queued >= self.max_batch_size:  # else the loop is gathering
            self._wakeup.set()
        return job

    def _abandon(self, job: Job, exc: Exception | None = None) -> bool:
        """Give up a job that has not started computing (it never will): its future gets ``exc``
        (cancelled without one). False, and nothing done, if it started."""
        with self._lock:
            if job.started:
                return False
            job.abandoned = True
        if not job.future.done():
            if exc is None:
                job.future.cancel()
            else:
                job.future.set_exception(exc)
        return True

    def cancel(self, job: Job) -> None:
        """Its requester went away (the engine process got a cancel): never computed if not started."""
        self._abandon(job)

    def _expire(self, job: Job) -> None:
        """The deadline timer: 504 now. A job that has not started never does; one computing finishes
        its batch (rows are computed together) and its rows are dropped."""
        if not job.future.done():
            waited = time.monotonic() - job.enqueued
            if not self._abandon(job, DeadlineExceeded(f"deadline passed after {waited:.3f} s queued")):
                msg = f"deadline passed after {waited:.3f} s, while its batch was computing"
                job.future.set_exception(DeadlineExceeded(msg))

    def _client_left(self, job: Job) -> None:
        exc = ClientClosed("client disconnected")
        if not self._abandon(job, exc) and not job.future.done():  # started: its rows are dropped
            job.future.set_exception(exc)

    async def wait(self, job: Job, leaving: Leaving | None = None, timed: bool = True) -> list[np.ndarray]:
        """The job's probabilities per row. 504 when its deadline passes (if it had not started
        computing, it never is); if the client leaves (``leaving`` says so) it is skipped.

        ``timed=False``: the caller holds the deadline already (the outer layer cancels the request at
        it, and the job is abandoned here then): no timer of its own. Hot path: at most one timer and
        (with ``leaving``) one probe in the client watch (service/client_watch.py); the future is
        awaited directly (``asyncio.wait`` cost about a tenth of the event loop's time)."""
        timer = None
        if timed:
            timer = job.future.get_loop().call_later(
                max(0.0, job.deadline - time.monotonic()), self._expire, job
            )
        stop = leaving(functools.partial(self._client_left, job)) if leaving is not None else None
        try:
            return await job.future
        finally:
            if timer is not None:
                timer.cancel()
            if stop is not None:
                stop()
            if not job.future.done() or job.future.cancelled():  # the waiter itself was cancelled
                self._abandon(job)

    # -- the loop -----------------------------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="mtserve-batcher")

    async def stop(self) -> None:
        """Stop admitting, finish every admitted job, stop the executor."""
        self._stopping = True
        self._wakeup.set()
        if self._loop_task is not None:
            await self._loop_task
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))
        self.executor.shutdown(wait=True)

    def _oldest(self) -> float | None:
        heads = [q[0].enqueued for q in self.queues.values() if q]
        return min(heads) if heads else None

    async def _fill(self) -> None:
        """Continuous batching: return when the next batch should be collected.

        - Rows that reached an idle engine go at once: no waiting at low load.
        - While a batch runs, the next one gathers rows. A full batch is queued behind the running
          one (the engine goes straight on to it); a partial one waits for the engine to finish.
        - When the engine finishes, rows that arrived while it worked go once their oldest has
          waited ``max_wait`` (usually already true: they waited for the batch before them).
        """
        while self._queued_rows < self.max_batch_size and not self._stopping:
            oldest = self._oldest()
            if oldest is None:
                return
            if not self._in_flight:
                if oldest >= self._free_since:  # arrived while the engine was idle
                    return
                left = oldest + self.max_wait - time.monotonic()
                if left <= 0:
                    return
            else:
                left = None  # until the engine finishes or the batch fills
            self._wakeup.clear()  # set by a full queue or by the engine finishing its batch
            if left is None:
                await self._wakeup.wait()
                continue
            # or by a timer when the oldest row has waited max_wait (not ``asyncio.wait_for``: a task
            # and a timeout context per wait, on the event loop, about once per batch at low load).
            # Once it fires the batch goes: uvloop's timers count whole milliseconds (0.4 ms is 0, a
            # timer due at once), so waiting again for what is left spun the loop, about 90 times for
            # 0.4 ms, after most batches under load. The wait is max_wait to the loop's precision.
            self._timed_out = False
            timer = asyncio.get_running_loop().call_later(left, self._time_out)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()
            if self._timed_out:
                return

    def _time_out(self) -> None:
        self._timed_out = True
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            if len(self._in_flight) >= 2:  # one batch running, the next one ready behind it
                await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
                continue
            if self._queued_rows <= 0:
                if self._stopping:
                    return
                self._wakeup.clear()
                self._idle = True
                await self._wakeup.wait()
                self._idle = False
                continue
            try:
                await self._step()
            except Exception:  # a bug here must not stop the loop and hang every request
                log.exception("batcher step failed")
                await asyncio.sleep(0.001)

    async def _step(self) -> None:
        await self._fill()
        now = time.monotonic()
        batch = collect(self.queues, self.max_batch_size, now, self._start, self.per_task)
        self._start += 1
        self.queued_rows -= batch.rows + sum(j.left for j in batch.expired + batch.skipped)
        for job in batch.expired:
            if not job.future.done():
                job.future.set_exception(DeadlineExceeded("deadline passed while queued"))
        if not batch.slices:
            return
        if self.observe_queue is not None:
            for job, a, _ in batch.slices:
                if a == 0:
                    self.observe_queue(job.task, now - job.enqueued)
        self._launch(batch)

    def _launch(self, batch: Batch) -> None:
        """Hand the batch to the engine thread; :meth:`_finish` runs on the loop when it is done (one
        loop future per batch, no executor future, no task)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()  # what ``stop`` and a full pipeline wait on
        self._in_flight.add(done)
        soon, finish = loop.call_soon_threadsafe, self._finish
        self.executor.call(self._compute, batch, lambda result, exc: soon(finish, batch, result, exc, done))

    def _finish(self, batch: Batch, result, error: BaseException | None, done: asyncio.Future) -> None:
        """On the loop: hand every job its rows (or the engine's error: it fails this batch, never the
        loop); the engine is free for a waiting batch."""
        try:
            if error is not None:
                raise error
            live, probs, runs = result
        except Exception as exc:
            log.error("batch of %d rows failed", batch.rows, exc_info=exc)
            for job, _, _ in batch.slices:
                if not job.future.done():
                    job.future.set_exception(exc)
        else:
            self._deliver(live, probs)
            if self.observe_segments is not None and runs:
                self.observe_segments(runs)  # here on the loop: buffered with the per-request updates
            for job in batch.expired:
                if not job.future.done():
                    job.future.set_exception(DeadlineExceeded("deadline passed before its batch ran"))
        finally:
            self._in_flight.discard(done)
            done.set_result(None)
            if not self._in_flight:
                self._free_since = time.monotonic()
            self._wakeup.set()  # the engine is free: a waiting batch may go

    def _compute(self, batch: Batch) -> tuple[list[tuple[Job, int, int]], list[np.ndarray], list[SegmentRun]]:
        """Runs in the executor thread: drop jobs abandoned while the batch waited, mark the rest
        started, sort them in the engine's row order (if it has one), concatenate, infer, softmax; the
        segments' runs go back to the loop for the metrics."""
        now = time.monotonic()
        with self._lock:
            for job, _, _ in batch.slices:  # past its deadline and not started: never computed
                if not job.started and job.deadline <= now:
                    job.abandoned = True
                    batch.expired.append(job)
            live = [s for s in batch.slices if not s[0].abandoned]
            for job, _, _ in live:
                job.started = True
        if not live:
            return live, [], []
        rank = getattr(self.engine, "row_order", None)
        if rank and len(live) > 1:  # in the engine's order (stable: fair order within a task): no copy there
            live.sort(key=lambda s: rank.get(s[0].task, -1))
        parts = [job.x[a:b] for job, a, b in live]
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        tasks = [job.task for job, a, b in live for _ in range(b - a)]
        logits, runs = self.engine.infer(x, tasks)
        return live, softmax_rows(logits), runs

    @staticmethod
    def _deliver(slices: list[tuple[Job, int, int]], probs: list[np.ndarray]) -> None:
        i = 0
        for job, a, b in slices:
            job.out[a:b] = probs[i : i + b - a]
            i += b - a
            job.done += b - a
            if job.done == job.rows and not job.future.done():
                job.future.set_result(job.out)
