"""The running service: settings, manifest, engine, batcher, preprocessing, metrics, readiness."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import Request

from service.batcher import Batcher
from service.engine import Engine
from service.errors import NotReady, UnknownTask
from service.manifest import Manifest, TaskSpec
from service.metrics import Metrics
from service.preprocess import Preprocessor
from service.settings import Settings

log = logging.getLogger("mtserve")


async def disconnected(request: Request) -> None:
    """Completes when the client goes away (or, on some servers, when the response is done)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[dict]:
    k = min(k, len(labels))
    idx = np.argpartition(-probs, k - 1)[:k] if k < len(labels) else np.arange(len(labels))
    idx = idx[np.argsort(-probs[idx], kind="stable")]
    return [{"label": labels[i], "index": int(i), "score": float(probs[i])} for i in idx]


class Service:
    """Everything the routes need; one per app."""

    def __init__(self, settings: Settings, engine: Engine, on_fatal: Callable[[str], None] | None = None):
        self.settings = settings
        self.engine = engine
        self.manifest: Manifest = engine.manifest
        self.metrics = Metrics(self.manifest, settings.max_batch_size)
        self.metrics.queue_depth.set_function(lambda: max(0, self.batcher.queued_rows))
        self.batcher = Batcher(
            engine,
            list(self.manifest.tasks),
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
            per_task=settings.batching == "per-task",
            observe_segments=self.metrics.observe_segments,
            observe_queue=self.metrics.observe_queue,
        )
        self.pool = ThreadPoolExecutor(settings.decode_workers(), thread_name_prefix="mtserve-decode")
        self.preprocess = Preprocessor(
            self.manifest.input, self.pool, settings.max_pixels, self.metrics.preprocess_duration.observe
        )
        self.ready = False
        self.draining = False
        self.failed: str | None = None
        self.on_fatal = on_fatal
        self._ready_event = asyncio.Event()
        self._starting: asyncio.Task | None = None

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the batcher; load and warm the engine in the background (``/readyz`` 503 until then)."""
        self.batcher.start()
        self._starting = asyncio.get_running_loop().create_task(self._start_engine())

    async def _start_engine(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.batcher.executor, self.engine.start)
        except Exception as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            log.error("engine failed to start: %s", self.failed)
            if self.on_fatal is not None:
                self.on_fatal(self.failed)
            return
        finally:
            self._ready_event.set()
        self.metrics.set_model_info(self.engine.providers)
        self.ready = True
        log.info(
            "ready: bundle %s %s on %s", self.manifest.name, self.manifest.version, self.engine.providers
        )

    async def wait_ready(self) -> bool:
        await self._ready_event.wait()
        return self.ready

    async def stop(self) -> None:
        """Stop admitting (503), finish every admitted request, release the engine."""
        self.draining = True
        await self._ready_event.wait()
        await self.batcher.stop()
        self.engine.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- per request --------------------------------------------------------------------------
    def task(self, name: str) -> TaskSpec:
        spec = self.manifest.tasks.get(name)
        if spec is None:
            raise UnknownTask(f"unknown task {name!r}; tasks are {sorted(self.manifest.tasks)}")
        return spec

    def admit(self) -> None:
        if self.draining:
            raise NotReady("the server is shutting down")
        if not self.ready:
            raise NotReady(self.failed or "the model is loading")

    def deadline(self) -> float:
        return time.monotonic() + self.settings.timeout_ms / 1000.0

    async def infer(self, task: str, x: np.ndarray, request: Request, deadline: float) -> list[np.ndarray]:
        """Queue the rows; await their probabilities (504 past the deadline, skipped if the client left)."""
        job = self.batcher.submit(task, x, deadline)
        return await self.batcher.wait(job, disconnected(request))
