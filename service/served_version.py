"""One loaded bundle version: its engine and its batcher, leased by the requests admitted to it."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from fastapi import Request

from contract.errors import DeadlineExceeded
from contract.manifest import Manifest, TaskSpec
from service.admission import DEADLINE
from service.batcher import Batcher
from service.client_watch import ClientWatch
from service.engine_types import Engine
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("mtserve")


class ServedVersion:
    """One loaded bundle version: its engine and its batcher. ``async with`` = one admitted request
    (a lease): a retired unit is closed after its last lease is released (or, on reload, once every
    request admitted to it is past its deadline)."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics, path: Path):
        self.engine = engine
        self.manifest: Manifest = engine.manifest
        self.version = self.manifest.version
        self.path = path
        self.loaded_at: str | None = None
        self.batcher = Batcher(
            engine,
            list(self.manifest.tasks),
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
            per_task=settings.batching == "per-task",
            observe_segments=metrics.observe_segments,
            observe_queue=metrics.observe_queue,
        )
        self.watch = ClientWatch()  # which clients left while their rows wait
        self.leases = 0
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    def task(self, name: str) -> TaskSpec:
        return self.manifest.task(name)

    def __enter__(self) -> ServedVersion:
        """A lease: the version serves the request until it is answered (``with``, no coroutine: the
        routes take one per request)."""
        if self.leases == 0:
            self._idle.clear()
        self.leases += 1
        return self

    def __exit__(self, *exc) -> None:
        self.leases -= 1
        if self.leases == 0:
            self._idle.set()

    async def __aenter__(self) -> ServedVersion:
        return self.__enter__()

    async def __aexit__(self, *exc) -> None:
        self.__exit__()

    async def start(self) -> None:
        """Start the batcher loop; create and warm up the sessions in the unit's executor thread."""
        self.batcher.start()
        await asyncio.get_running_loop().run_in_executor(self.batcher.executor, self.engine.start)
        self.loaded_at = datetime.now(UTC).isoformat(timespec="seconds")

    async def close(self, wait_s: float | None = None) -> None:
        """Wait for every admitted request (at most ``wait_s``), finish the queue and every batch
        started, stop the executor, release the sessions."""
        try:
            await asyncio.wait_for(self._idle.wait(), wait_s)
        except TimeoutError:  # e.g. a client still sending its body, long past its deadline
            log.warning(
                "version %s: %d request(s) admitted to it still unfinished after %.1f s; closing it "
                "(they answer 504)", self.version, self.leases, wait_s,
            )  # fmt: skip
        self.closing = True
        await self.batcher.stop()
        self.engine.stop()

    async def infer(self, task: str, x: np.ndarray, request: Request, deadline: float) -> list[np.ndarray]:
        """Queue the rows; await their probabilities (504 past the deadline, skipped if the client left)."""
        if self.closing:  # only after every deadline of requests admitted to it has passed
            raise DeadlineExceeded(f"deadline passed before the rows reached version {self.version}")
        job = self.batcher.submit(task, x, deadline)
        timed = DEADLINE not in request.scope  # else the layer that stamped it answers 504 at it
        return await self.batcher.wait(job, self.watch.leaving(request.receive), timed)
