"""The running service: settings, the model version served, preprocessing, metrics, readiness, reload.

A loaded bundle version is a :class:`ServedVersion`: its engine and its own batcher (queue + executor
thread). The service serves one *current* unit. A request resolves the current unit when it is
admitted (``with service.acquire(task) as model``) and keeps it until its answer is built,
so a request admitted before a reload finishes on the old version and one admitted after it runs
on the new one. :meth:`Service.reload` loads, verifies and warms the new version off the event
loop while the old one keeps serving, swaps them (one assignment on the event loop), then lets the
old one drain (its admitted requests finish) and closes its sessions.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import Request

from contract.errors import (
    BundleError,
    Conflict,
    Forbidden,
    NotReady,
    ServiceError,
    UnknownTask,
)
from contract.manifest import Manifest, TaskSpec
from service.admission import Admission
from service.batcher import Batcher
from service.engine_types import Engine
from service.heap import default_trimmer
from service.loop_lag import LoopLag
from service.metrics import Metrics
from service.preprocess import Preprocessor
from service.reload_rule import check_compatible
from service.served_version import ServedVersion
from service.settings import Settings

log = logging.getLogger("mtserve")

EngineFactory = Callable[[Path], Engine]


class Service:
    """Everything the routes need; one per app."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        on_fatal: Callable[[str], None] | None = None,
        engine_factory: EngineFactory | None = None,
    ):
        self.settings = settings
        self.metrics = Metrics(engine.manifest, settings.max_batch_size)
        self.unit = ServedVersion(engine, settings, self.metrics, settings.bundle.absolute())
        self.retiring: set[ServedVersion] = set()
        self.metrics.queue_depth.set_function(
            lambda: sum(max(0, u.batcher.queued_rows) for u in (self.unit, *self.retiring))
        )
        self.pool = ThreadPoolExecutor(settings.decode_workers(), thread_name_prefix="mtserve-decode")
        # one preprocessor for every version: a reload may not change the input spec
        self.preprocess = Preprocessor(
            self.manifest.input, self.pool, settings.max_pixels, self.metrics.observe_preprocess
        )
        self.engine_factory = engine_factory
        self.admission = Admission(settings.timeout_ms, settings.inflight_limit(), self._room, LoopLag())
        self.on_fatal = on_fatal
        self.reloads = 0
        self._reload: asyncio.Task | None = None
        self._ready_event = asyncio.Event()
        self._starting: asyncio.Task | None = None

    def _room(self) -> tuple[int, int]:
        b = self.unit.batcher
        return b.queued_rows, b.queue_size

    # readiness and draining live in the admission object
    @property
    def ready(self) -> bool:
        return self.admission.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self.admission.ready = value

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.admission.draining = value

    @property
    def failed(self) -> str | None:
        return self.admission.failed

    @failed.setter
    def failed(self, value: str | None) -> None:
        self.admission.failed = value

    # the version served now (each request holds the unit it was admitted on)
    @property
    def manifest(self) -> Manifest:
        return self.unit.manifest

    @property
    def engine(self) -> Engine:
        return self.unit.engine

    @property
    def batcher(self) -> Batcher:
        return self.unit.batcher

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm the engine in the background (``/readyz`` 503 until then)."""
        self.metrics.buffer_on_this_thread()
        self.admission.lag.start()
        self._starting = asyncio.get_running_loop().create_task(self._start_engine())

    async def _start_engine(self) -> None:
        try:
            await self.unit.start()
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
        if self._reload is not None:  # it sees `draining` and does not swap
            await asyncio.gather(self._reload, return_exceptions=True)
        await self.unit.close(wait_s=self.settings.timeout_ms / 1000.0 + 1.0)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.admission.lag.stop()
        self.metrics.buffer.flush()

    # -- per request --------------------------------------------------------------------------
    def task(self, name: str) -> TaskSpec:
        return self.unit.task(name)

    def admit(self) -> None:
        """503 unless ready and not draining."""
        self.admission.check_ready()

    def acquire(self, task: str, model_version: str | None = None) -> ServedVersion:
        """Admission: the version served now, for ``async with`` (404 unknown task or version, 503
        not ready). The request keeps this version until it is answered, whatever reloads happen."""
        unit = self.unit
        unit.task(task)  # 404 for a task the version does not serve
        if model_version is not None and model_version != unit.version:
            raise UnknownTask(f"model {task!r} has no version {model_version!r}; it has {unit.version!r}")
        self.admission.check()  # 503, or 429 before the body is read when the queue is full
        return unit

    def deadline(self, request: Request | None = None) -> float:
        """The request's deadline (``time.monotonic()``): see :meth:`Admission.deadline`."""
        return self.admission.deadline(request.scope if request is not None else None)

    # -- admin: live reload ---------------------------------------------------------------------
    def resolve_bundle(self, requested: str | None) -> Path:
        """The bundle directory a reload loads: the configured one, or ``requested`` (relative to the
        model directory), which must resolve (symlinks followed) inside the model directory."""
        if requested is None:
            return self.settings.bundle.resolve()
        root = self.settings.models_root()
        try:
            target = (root / requested).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
            raise BundleError(f"bundle {requested!r}: cannot be resolved ({exc})") from None
        if not target.is_relative_to(root):
            raise Forbidden(f"bundle {requested!r} resolves to {target}, outside the model directory {root}")
        return target

    def status(self) -> dict:
        u = self.unit
        return {
            "bundle": u.manifest.name,
            "version": u.version,
            "path": str(u.path),
            "model_dir": str(self.settings.models_root()),
            "tasks": list(u.manifest.tasks),
            "providers": list(u.engine.providers),
            "loaded_at": u.loaded_at,
            "reloads": self.reloads,
            "reload_in_progress": self._reload is not None,
        }

    async def reload(self, requested: str | None, *, allow_remove: bool = False) -> dict:
        """Load, verify, warm up and swap in a bundle; one at a time (409), the old version serving
        meanwhile. Returns once the new version serves and the old one is drained and closed."""
        if self.draining:
            raise NotReady("the server is shutting down")
        if not self.ready:
            raise Conflict(self.failed or "the model is still loading; reload after /readyz answers 200")
        if self._reload is not None:
            raise Conflict("a reload is already in progress; retry when it has finished")
        if self.engine_factory is None:
            raise Conflict("this server was built without an engine factory: it cannot reload")
        target = self.resolve_bundle(requested)
        self._reload = asyncio.get_running_loop().create_task(
            self._swap_in(target, allow_remove), name="mtserve-reload"
        )
        # shielded: a client that hangs up does not abandon a half-done reload
        return await asyncio.shield(self._reload)

    def _build(self, target: Path) -> Engine:
        """Runs in a thread: read and verify the bundle, build its engine (an unreadable file is a
        refused bundle, 422, not a server error)."""
        try:
            return self.engine_factory(target)  # type: ignore[misc]
        except OSError as exc:
            raise BundleError(f"{target}: cannot be read ({exc})") from exc

    async def _swap_in(self, target: Path, allow_remove: bool = False) -> dict:
        t0 = time.perf_counter()
        old = self.unit
        log.info("reload: loading %s (serving %s %s)", target, old.manifest.name, old.version)
        try:
            # manifest, sha256, shapes; in the process's background thread (service/heap.py): a reload
            # starts no thread of its own but the new version's engine thread
            engine = await asyncio.wrap_future(default_trimmer().submit(self._build, target))
            where = str(target / "manifest.json")
            check_compatible(old.manifest, engine.manifest, where, allow_remove=allow_remove)
            t1 = time.perf_counter()
            unit = ServedVersion(engine, self.settings, self.metrics, target)
            try:
                await unit.start()  # sessions + warm-up, in the new unit's executor thread
                if self.draining:
                    raise NotReady("the server is shutting down; the reload was abandoned")
            except BaseException as exc:
                await unit.close()
                if isinstance(exc, Exception) and not isinstance(exc, (BundleError, ServiceError)):
                    raise BundleError(f"{target}: cannot be served ({type(exc).__name__}: {exc})") from exc
                raise
            t2 = time.perf_counter()
            # the swap: admissions from here on get the new unit
            self.unit = unit
            self.retiring.add(old)
            self.reloads += 1
            self.metrics.set_model_info(unit.engine.providers, unit.manifest)
            log.info(
                "reload: now serving %s %s from %s (was %s %s); verified in %.3f s, warmed up in %.3f s",
                unit.manifest.name, unit.version, target, old.manifest.name, old.version, t1 - t0, t2 - t1,
            )  # fmt: skip
            # every request admitted to the old version is answered or past its deadline by then
            await old.close(wait_s=self.settings.timeout_ms / 1000.0 + 1.0)
            self.retiring.discard(old)
            gc.unfreeze()  # what start-up froze (the first version among it) may be garbage now
            t3 = time.perf_counter()
            log.info("reload: version %s drained and closed in %.3f s", old.version, t3 - t2)
        except Exception as exc:
            log.warning("reload of %s refused; still serving %s: %s", target, old.version, exc)
            raise
        finally:
            self._reload = None
        return {
            "bundle": unit.manifest.name,
            "version": unit.version,
            "previous_version": old.version,
            "path": str(target),
            "verify_s": round(t1 - t0, 4),
            "warmup_s": round(t2 - t1, 4),
            "drain_s": round(t3 - t2, 4),
            "total_s": round(t3 - t0, 4),
        }
