"""An API process of ``--workers N``: the :class:`~service.server_state.Service` interface the routes use,
with the engine in another process (:mod:`service.engine_core`, reached through
:class:`~service.engine_client.EngineClient`).

The API process does HTTP, validation, decoding and preprocessing, and answers; it reads what the
engine publishes in the :class:`~service.engine_status.StatusBlock`: the room (so the outer layer sheds
429 before reading a body when the engine's queue is full), readiness, draining, the model generation
served. A request is admitted to the current :class:`RemoteVersion` (a generation) and keeps it until
answered, whatever reloads happen; this process reports the oldest generation it still has requests
on, and the engine retires a version only once every API process is past it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from starlette.requests import Request

from contract.errors import NotReady, UnknownTask
from contract.manifest import Manifest, TaskSpec, read_manifest
from service.admission import Admission
from service.client_watch import ClientWatch
from service.engine_client import EngineClient
from service.engine_status import DRAINING, ENGINE_PID, GEN, QUEUED, READY, StatusBlock, watch_supervisor
from service.loop_lag import LoopLag
from service.metrics import Metrics
from service.preprocess import Preprocessor
from service.row_arena import RowArena
from service.settings import Settings

log = logging.getLogger("mtserve.front")
SYNC_S = 0.01  # how often an API process reads the engine's state


class RemoteVersion:
    """One model generation served by the engine, seen from an API process (``async with`` = a lease)."""

    def __init__(self, front: FrontService, manifest: Manifest, gen: int, path: Path):
        self.front = front
        self.manifest = manifest
        self.version = manifest.version
        self.gen = gen
        self.path = path
        self.leases = 0

    def task(self, name: str) -> TaskSpec:
        return self.manifest.task(name)

    def __enter__(self) -> RemoteVersion:
        """A lease (``with``, no coroutine: one per request)."""
        self.leases += 1
        return self

    def __exit__(self, *exc) -> None:
        self.leases -= 1
        if self.leases == 0 and self is not self.front.unit:
            self.front.report_generation()

    async def __aenter__(self) -> RemoteVersion:
        return self.__enter__()

    async def __aexit__(self, *exc) -> None:
        self.__exit__()

    async def infer(self, task: str, x: np.ndarray, request: Request, deadline: float) -> list[np.ndarray]:
        """Send the rows to the engine; await their probabilities (504, 429, 499 and 503 as there).
        A client that leaves (also while its body was decoded) is seen by the client watch within
        its interval and the engine is told to drop the rows (no per-request ``is_disconnected()``
        probe first: its anyio cancel scope cost ~7 % of this process's event loop)."""
        leaving = self.front.watch.leaving(request.receive)
        _, probs = await self.front.client.infer(task, x, self.gen, deadline, leaving)
        return list(probs)


class EngineView:
    """``service.engine`` in an API process: what the engine published of itself."""

    def __init__(self, block: StatusBlock):
        self.block = block

    @property
    def providers(self) -> list[str]:
        return list(self.block.info().get("status", {}).get("providers", []))

    def describe(self) -> dict:
        return dict(self.block.info().get("describe") or {})


class FrontService:
    """What the routes need (the :class:`Service` interface), in an API process."""

    def __init__(
        self, settings: Settings, block: StatusBlock, endpoint: str, index: int, arena: RowArena | None = None
    ):
        self.settings = settings
        self.block = block
        self.index = index
        info = block.info()
        self.unit = RemoteVersion(self, read_manifest(Path(info["path"])), info["gen"], Path(info["path"]))
        self.older: set[RemoteVersion] = set()
        self.engine = EngineView(block)
        self.watch = ClientWatch()  # which clients left while their rows are in the engine
        self.metrics = Metrics(self.manifest, settings.max_batch_size)
        self.metrics.queue_depth.set_function(lambda: block.ints[QUEUED])
        self.metrics.live.processes = self.processes
        self.pool = ThreadPoolExecutor(settings.decode_workers(), thread_name_prefix="mtserve-decode")
        self.preprocess = Preprocessor(
            self.manifest.input, self.pool, settings.max_pixels, self.metrics.observe_preprocess
        )
        self.admission = Admission(settings.timeout_ms, settings.inflight_limit(), block.room, LoopLag())
        spilled = self.metrics.rows_spilled.inc
        self.client = EngineClient(endpoint, block.ints[ENGINE_PID], self._engine_died, arena, index, spilled)
        self.engine_factory = None
        self.on_fatal: Callable[[str], None] | None = None
        self.on_orphaned: Callable[[], None] | None = None  # the supervisor died: exit
        self._draining = False
        self._fatal: str | None = None
        self._sync_task: asyncio.Task | None = None
        self._unwatch: Callable[[], None] | None = None  # ends the watch on the supervisor
        block.set_api_gen(index, self.unit.gen)

    # readiness: the engine's (published), and this process's draining
    @property
    def ready(self) -> bool:
        return self.admission.ready

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        self.admission.draining = value or bool(self.block.ints[DRAINING])

    @property
    def failed(self) -> str | None:
        return self.admission.failed

    @property
    def manifest(self) -> Manifest:
        return self.unit.manifest

    def processes(self) -> dict[str, int]:
        """name -> pid of every process of the server (for ``mtserve_process_cpu_seconds_total``)."""
        out = {"supervisor": os.getppid(), "engine": self.block.ints[ENGINE_PID]}
        out.update((f"api-{i}", pid) for i, pid in enumerate(self.block.api_pids()) if pid)
        return out

    # -- life cycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.metrics.buffer_on_this_thread()
        self.admission.lag.start()
        await self.client.start()
        self._unwatch = watch_supervisor(loop, self._supervisor_died)
        self.sync()
        self._sync_task = loop.create_task(self._sync_loop(), name="mtserve-front-sync")

    async def wait_ready(self) -> bool:
        while not self.ready and self.failed is None:
            await asyncio.sleep(SYNC_S)
        return self.ready

    async def stop(self) -> None:
        self.draining = True
        if self._sync_task is not None:
            self._sync_task.cancel()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        await self.client.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.admission.lag.stop()
        self.metrics.buffer.flush()

    def _supervisor_died(self) -> None:
        self._fail("the supervisor process exited")
        if self.on_orphaned is not None:
            self.on_orphaned()

    def _engine_died(self, reason: str) -> None:
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        self._fatal = reason
        self.admission.ready = False
        self.admission.failed = reason
        if self.on_fatal is not None:
            self.on_fatal(reason)

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            try:
                self.sync()
            except Exception:  # e.g. a manifest that cannot be read: keep serving the current one
                log.exception("reading the engine's state failed")

    def sync(self) -> None:
        """Read the engine's published state: readiness, draining, a new model generation."""
        ints = self.block.ints
        if self._fatal is None:
            ready = bool(ints[READY])
            if ready and not self.admission.ready:
                self.metrics.set_model_info(self.engine.providers)
            self.admission.ready = ready
            self.admission.failed = self.block.info().get("failed")
        self.admission.draining = self._draining or bool(ints[DRAINING])
        if ints[GEN] > self.unit.gen:
            self._move_to(self.block.info())

    def _move_to(self, info: dict) -> None:
        """The engine serves a new generation: admit to it from now on (requests admitted to the old
        one finish there)."""
        path = Path(info["path"])
        old, self.unit = self.unit, RemoteVersion(self, read_manifest(path), info["gen"], path)
        if old.leases:
            self.older.add(old)
        self.metrics.set_model_info(self.engine.providers, self.unit.manifest)
        log.info(
            "generation %d: now admitting to version %s (was %s)",
            self.unit.gen,
            self.unit.version,
            old.version,
        )
        self.report_generation()

    def report_generation(self) -> None:
        """Tell the engine the oldest generation this process still has requests admitted to."""
        self.older = {u for u in self.older if u.leases}
        self.block.set_api_gen(self.index, min([u.gen for u in self.older] + [self.unit.gen]))

    # -- per request (the Service interface) ---------------------------------------------------------
    def task(self, name: str) -> TaskSpec:
        return self.unit.task(name)

    def admit(self) -> None:
        self.admission.check_ready()

    def acquire(self, task: str, model_version: str | None = None) -> RemoteVersion:
        """As :meth:`Service.acquire`. The generation is read at every admission, so a request admitted
        after another one (by any API process) saw a new version is admitted to it too."""
        if self.block.ints[GEN] > self.unit.gen:
            self._move_to(self.block.info())
        unit = self.unit
        unit.task(task)
        if model_version is not None and model_version != unit.version:
            raise UnknownTask(f"model {task!r} has no version {model_version!r}; it has {unit.version!r}")
        self.admission.check()
        return unit

    def deadline(self, request: Request | None = None) -> float:
        return self.admission.deadline(request.scope if request is not None else None)

    # -- admin ---------------------------------------------------------------------------------------
    def status(self) -> dict:
        return dict(self.block.info().get("status", {}))

    async def reload(self, requested: str | None, *, allow_remove: bool = False) -> dict:
        """Forwarded to the engine, which loads, verifies, warms up and swaps (every API process then
        admits to the new generation); returns once the old version is drained and closed."""
        if self.draining:
            raise NotReady("the server is shutting down")
        result = await self.client.call("reload", requested, allow_remove=allow_remove)
        for _ in range(100):  # answer once this process admits to the new version
            self.sync()
            if self.unit.version == result.get("version"):
                break
            await asyncio.sleep(SYNC_S)
        with contextlib.suppress(Exception):
            self.metrics.set_model_info(self.engine.providers, self.unit.manifest)
        return result
