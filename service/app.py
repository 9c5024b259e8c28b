"""The app factory: ``create_app(settings, engine=None)``.

Without an engine it loads and verifies the bundle now (errors name the file and the field) and
builds an onnxruntime engine, whose sessions are created and warmed up in the background once the
app starts; ``/readyz`` answers 503 until then. Tests pass a fake engine (tests/fakes.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel

from contract.bundle import load_bundle
from service import admin, api, errors, oip
from service.engine import OrtEngine
from service.engine_types import Engine
from service.gc_tuning import settle_after_start_up
from service.hot_path import HotPaths
from service.outer_layer import OuterLayer
from service.schemas import PredictJSON, ReloadRequest, V2InferRequest
from service.server_state import Service
from service.session_pool import default_pool
from service.settings import Settings

log = logging.getLogger("mtserve")


def build_engine(settings: Settings, path: Path | None = None) -> Engine:
    """Verify the bundle at ``path`` (default: the configured one; raises BundleError) and build the
    onnxruntime engine (not started)."""
    bundle = load_bundle(path or settings.bundle, verify_sha256=settings.verify_sha256)
    if settings.emulate_device_ms > 0:  # benchmarks of the front (issue 12): no onnxruntime
        from service.emulated_engine import EmulatedEngine

        return EmulatedEngine(bundle.manifest, settings.emulate_device_ms)
    warmup = sorted({1, settings.max_batch_size}) if settings.warmup else []
    return OrtEngine(
        bundle,
        device=settings.device,
        threads=settings.intra_op_threads(),
        device_id=settings.device_id,
        warmup_batch_sizes=warmup,
        buckets=settings.bucket_sizes(),  # batch buckets + a CUDA graph per (variant, bucket) (issue 13)
        cuda_graphs=settings.cuda_graphs == "on" and settings.device == "cuda",
        session_pool=default_pool(),  # a reload reuses the sessions of unchanged files (issue 14)
    )


class App(FastAPI):
    """FastAPI with :class:`service.outer_layer.OuterLayer` around its whole middleware stack (error handlers,
    routing): load shedding, deadlines, the body limit and request metrics come first, in one layer; and
    the lean path (:class:`service.hot_path.HotPaths`) in front of it all, which answers plain inference
    requests itself."""

    def build_middleware_stack(self):
        s = self.state.service
        outer = OuterLayer(super().build_middleware_stack(), s.admission, s.metrics, s.settings.max_body_mb)
        return HotPaths(outer, s)

    async def __call__(self, scope, receive, send) -> None:
        """Starlette's ``__call__`` for HTTP (the app in the scope, the stack built once; FastAPI's own
        adds only its telemetry, turned off in :func:`create_app`), without the frames of FastAPI's,
        Starlette's and the lean path's ``__call__``, which every request would resume at every
        suspension: a plain inference request goes straight to :meth:`HotPaths.serve`."""
        stack = self.middleware_stack
        if stack is None or self.root_path or scope["type"] != "http":  # lifespan, websocket: FastAPI's
            return await super().__call__(scope, receive, send)
        scope["app"] = self
        if (route := stack.route(scope)) is not None:
            return await stack.serve(scope, receive, send, *route)
        await stack.outer(scope, receive, send)


def _document_bodies(app: FastAPI, models: tuple[type[BaseModel], ...]) -> None:
    """Request bodies the routes read themselves (several media types, binary extension) are
    not FastAPI parameters: add their schemas to the OpenAPI components."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = original()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
        return app.openapi_schema or schema

    app.openapi = openapi


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    on_fatal: Callable[[str], None] | None = None,
    engine_factory: Callable[[Path], Engine] | None = None,
    service: Service | None = None,
) -> FastAPI:
    """The FastAPI app. ``on_fatal(message)`` is called if the engine cannot start.
    ``engine_factory(path)`` builds the engine of a bundle ``POST /admin/reload`` loads (default: the
    onnxruntime engine, :func:`build_engine`). An API process of ``--workers N`` passes its ``service``
    (service/front_service.py: the same interface, the engine in another process) and no engine."""
    if service is None:
        engine = engine if engine is not None else build_engine(settings)
        service = Service(settings, engine, on_fatal, engine_factory or partial(build_engine, settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        settle_after_start_up()  # what start-up built is frozen; young collections past the working set
        try:
            yield
        finally:
            await service.stop()

    m = service.manifest
    app = App(
        title="mtserve",
        summary=f"Multi-task image classification: bundle {m.name} {m.version}, tasks {', '.join(m.tasks)}",
        version=oip._version(),
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},  # Prometheus is the metrics surface
    )
    app.state.service = service
    errors.install(app)
    app.include_router(api.router)
    app.include_router(oip.router)
    admin_on = settings.admin_token is not None
    if admin_on:  # else /admin is not mounted at all: 404 like any unknown path
        app.include_router(admin.router)
    log.info("admin API %s", f"on, model dir {settings.models_root()}" if admin_on else "off (no token)")
    _document_bodies(app, (PredictJSON, V2InferRequest) + ((ReloadRequest,) if admin_on else ()))
    return app
