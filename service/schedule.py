"""The batcher's pure core: a request's rows in the queue (:class:`Job`), one batch (:class:`Batch`),
and :func:`collect`, which forms a batch from per-task FIFOs: up to ``max_rows`` rows, max-min fair
across tasks (round robin in shrinking quanta, starting from a rotating task), splitting a job across
batches when needed, dropping jobs whose client left and setting aside jobs whose deadline passed,
before anything is computed. No event loop, no thread: :class:`service.batcher.Batcher` runs it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np


class Job:
    """One request's rows in the queue (a plain class with slots: one is built per request)."""

    __slots__ = (
        "abandoned",
        "deadline",
        "done",
        "enqueued",
        "future",
        "out",
        "rows",
        "started",
        "taken",
        "task",
        "x",
    )

    def __init__(self, task: str, x: np.ndarray, future: asyncio.Future, deadline: float):
        self.task = task
        self.x = x  # [n, C, H, W] float32, preprocessed
        self.future = future
        self.deadline = deadline  # time.monotonic()
        self.enqueued = time.monotonic()
        self.rows = rows = int(x.shape[0])
        self.taken = 0  # rows handed to batches so far
        self.done = 0  # rows computed so far
        self.started = False  # a batch holding its rows began computing (set under Batcher._lock)
        self.abandoned = False  # deadline passed or client left before it started: never computed
        self.out: list[np.ndarray | None] = [None] * rows

    @property
    def left(self) -> int:
        return self.rows - self.taken


@dataclass
class Batch:
    slices: list[tuple[Job, int, int]] = field(default_factory=list)  # (job, first row, end row)
    expired: list[Job] = field(default_factory=list)
    skipped: list[Job] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(b - a for _, a, b in self.slices)

    @property
    def tasks(self) -> list[str]:
        return [job.task for job, a, b in self.slices for _ in range(b - a)]


def _take(queue: deque[Job], want: int, now: float, batch: Batch) -> int:
    """Take up to ``want`` rows from the head of one task's queue; return how many were taken."""
    got = 0
    while queue and got < want:
        job = queue[0]
        if job.abandoned or job.future.done():  # client left, deadline passed, or answered
            queue.popleft()
            batch.skipped.append(job)
            continue
        if job.taken == 0 and job.deadline <= now:
            queue.popleft()
            batch.expired.append(job)
            continue
        n = min(job.left, want - got)
        batch.slices.append((job, job.taken, job.taken + n))
        job.taken += n
        got += n
        if job.left == 0:
            queue.popleft()
    return got


def collect(
    queues: dict[str, deque[Job]], max_rows: int, now: float, start: int = 0, per_task: bool = False
) -> Batch:
    """Form one batch from per-task FIFOs (in ``queues`` order, beginning at index ``start``).

    cross-task: max-min fair shares: every round gives each task with rows waiting an equal quantum
    of the capacity left, so a flood on one task cannot starve another. per-task: the first task
    (from ``start``) with rows waiting fills the batch alone.
    """
    batch = Batch()
    names = list(queues)
    order = names[start % len(names) :] + names[: start % len(names)] if names else []
    if per_task:
        for task in order:
            if _take(queues[task], max_rows, now, batch):
                break
        return batch
    active = [t for t in order if queues[t]]
    capacity = max_rows
    while capacity > 0 and active:
        quantum = max(1, capacity // len(active))
        still = []
        for task in active:
            if capacity == 0:
                still.append(task)
                continue
            got = _take(queues[task], min(quantum, capacity), now, batch)
            capacity -= got
            if queues[task]:
                still.append(task)
        active = still
    return batch
