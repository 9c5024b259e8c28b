"""The outermost ASGI layer (service/outer_layer.py, service/admission.py) on a fake app and a fake
service: shedding (429 before the body is read), the deadline (504), the body limit (413), request
metrics; the loop-lag meter; ``top_indices``; the whole app on a fake engine (429 before routing, a
computing request 504)."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from contract.errors import PayloadTooLarge
from service.admission import DEADLINE, LAG_FLOOR_S, LAG_FRACTION, Admission
from service.app import create_app
from service.loop_lag import LoopLag
from service.metrics import Metrics
from service.outer_layer import OuterLayer
from service.postprocess import top_indices
from service.settings import Settings
from tests.fakes import FakeEngine, fake_manifest

PNG_HEADERS = [(b"content-type", b"image/png"), (b"content-length", b"10")]


class FakeLag:
    def __init__(self, lag: float = 0.0):
        self.lag = lag

    def current(self, now: float) -> float:
        return self.lag


def fake_service(**kw):
    settings = Settings(bundle="unused", **({"timeout_ms": 1000, "max_body_mb": 1} | kw))
    batcher = SimpleNamespace(queued_rows=0, queue_size=settings.queue_size)
    admission = Admission(
        settings.timeout_ms,
        settings.inflight_limit(),
        lambda: (batcher.queued_rows, batcher.queue_size),
        FakeLag(),
    )
    admission.ready = True
    return SimpleNamespace(
        settings=settings, metrics=Metrics(fake_manifest(), 8), admission=admission, batcher=batcher
    )


def Edge(app, svc):
    return OuterLayer(app, svc.admission, svc.metrics, svc.settings.max_body_mb)


class Inner:
    """The app behind the edge: records calls, reads the body, answers 200 after ``delay`` s."""

    def __init__(self, delay: float = 0.0, after_start: float = 0.0):
        self.calls = 0
        self.delay, self.after_start = delay, after_start
        self.cancelled = False
        self.deadline = None

    async def __call__(self, scope, receive, send):
        self.calls += 1
        self.deadline = scope.get(DEADLINE)
        await receive()
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(self.after_start)
        await send({"type": "http.response.body", "body": b"{}"})


async def call(edge, path="/predict/digits", method="POST", headers=PNG_HEADERS, body=b"x" * 10):
    """(status, headers dict, body bytes, receive calls)."""
    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    reads = []
    sent = []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await edge(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body_out, len(reads)


def counted(svc, task: str, code: str) -> float | None:
    return svc.metrics.registry.get_sample_value("mtserve_requests_total", {"task": task, "code": code})


def series_tasks(svc) -> set[str]:
    return {
        s.labels.get("task")
        for fam in svc.metrics.registry.collect()
        for s in fam.samples
        if "task" in s.labels and fam.name in ("mtserve_requests", "mtserve_request_duration_seconds")
    }


def assert_shed(status, headers, body, reads):
    assert status == 429
    assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
    err = json.loads(body)["error"]
    assert err["code"] == "queue_full" and err["message"]
    assert int(headers["content-length"]) == len(body)
    assert reads == 0  # the body was never read


# -- shedding --------------------------------------------------------------------------------------
async def test_under_the_limits_passes_through_and_is_counted():
    svc, inner = fake_service(), Inner()
    edge = Edge(inner, svc)
    status, _, _, reads = await call(edge)
    assert (status, inner.calls, reads) == (200, 1, 1)
    assert counted(svc, "digits", "200") == 1
    assert edge.inflight == 0
    assert inner.deadline is not None and inner.deadline > time.monotonic()  # the route's deadline


async def test_over_the_inflight_limit_429_before_the_app_and_the_body():
    svc = fake_service(max_inflight=2)
    inner = Inner(delay=10)
    edge = Edge(inner, svc)
    running = [asyncio.ensure_future(call(edge)) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert edge.inflight == 2
    assert_shed(*await call(edge, "/v2/models/animals/infer"))
    assert inner.calls == 2 and counted(svc, "animals", "429") == 1
    for r in running:
        r.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    assert edge.inflight == 0  # released however a request ends
    status, *_ = await call(edge, "/v2/models/animals/versions/7/infer")
    assert status != 429


def test_default_inflight_limit_is_the_queue_and_two_batches():
    assert Settings(bundle="x", queue_size=100, max_batch_size=8).inflight_limit() == 116
    assert Settings(bundle="x", max_inflight=5).inflight_limit() == 5


async def test_full_queue_and_late_loop_shed():
    svc, inner = fake_service(), Inner()
    edge = Edge(inner, svc)
    b = svc.batcher
    b.queued_rows = b.queue_size
    assert_shed(*await call(edge))
    b.queued_rows = b.queue_size - 1
    assert (await call(edge))[0] == 200
    assert edge.admission.max_lag == max(LAG_FLOOR_S, LAG_FRACTION * svc.settings.timeout_ms / 1000)
    svc.admission.lag.lag = edge.admission.max_lag * 1.5
    status, headers, body, reads = await call(edge)
    assert_shed(status, headers, body, reads)
    assert "event loop" in json.loads(body)["error"]["message"]
    svc.admission.lag.lag = 0.0
    assert (await call(edge))[0] == 200
    assert inner.calls == 2 and counted(svc, "digits", "429") == 2


async def test_unknown_task_is_shed_but_creates_no_series():
    svc, inner = fake_service(max_inflight=1), Inner(delay=10)
    edge = Edge(inner, svc)
    busy = asyncio.ensure_future(call(edge))
    await asyncio.sleep(0.01)
    assert_shed(*await call(edge, "/predict/no-such-task"))
    assert_shed(*await call(edge, "/v2/models/nope/infer"))
    busy.cancel()
    await asyncio.gather(busy, return_exceptions=True)
    assert series_tasks(svc) == {"digits", "animals", "shapes"}
    assert counted(svc, "no-such-task", "429") is None


@pytest.mark.parametrize("state", ["draining", "loading"])
async def test_loading_or_draining_is_not_shed(state):
    """The route answers 503 then (a shutdown under load answers 200 or 503, never 429)."""
    svc, inner = fake_service(max_inflight=1), Inner()
    svc.batcher.queued_rows = 10**6
    svc.admission.lag.lag = 100.0
    setattr(svc.admission, "draining" if state == "draining" else "ready", state == "draining")
    assert (await call(Edge(inner, svc)))[0] == 200 and inner.calls == 1


async def test_other_routes_are_never_shed():
    svc, inner = fake_service(), Inner()
    svc.batcher.queued_rows = 10**6
    edge = Edge(inner, svc)
    for path, method in [("/tasks", "GET"), ("/metrics", "GET"), ("/predict/digits", "GET")]:
        assert (await call(edge, path, method))[0] == 200
    assert inner.calls == 3


# -- deadline --------------------------------------------------------------------------------------
async def test_admitted_request_answers_504_at_its_deadline():
    svc, inner = fake_service(timeout_ms=100), Inner(delay=10)
    edge = Edge(inner, svc)
    t0 = time.perf_counter()
    status, _, body, _ = await call(edge)
    took = time.perf_counter() - t0
    assert status == 504 and json.loads(body)["error"]["code"] == "deadline_exceeded"
    assert 0.09 < took < 0.5, took
    assert inner.cancelled and edge.inflight == 0
    assert counted(svc, "digits", "504") == 1


async def test_an_answer_already_started_is_not_interrupted():
    svc, inner = fake_service(timeout_ms=50), Inner(after_start=0.15)
    status, _, body, _ = await call(Edge(inner, svc))
    assert status == 200 and body == b"{}" and not inner.cancelled


async def test_an_error_of_the_app_is_not_taken_for_the_deadline():
    svc = fake_service(timeout_ms=5000)

    async def failing(scope, receive, send):
        raise TimeoutError("the app's own")

    with pytest.raises(TimeoutError, match="the app's own"):
        await call(Edge(failing, svc))
    assert counted(svc, "digits", "500") == 1


# -- body limit ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/predict/digits", "/admin/reload"])
async def test_declared_body_over_the_limit_413(path):
    svc, inner = fake_service(max_body_mb=0.001), Inner()
    headers = [(b"content-length", b"2000")]
    status, _, body, reads = await call(Edge(inner, svc), path, headers=headers)
    assert (status, reads, inner.calls) == (413, 0, 0)
    assert json.loads(body)["error"]["code"] == "payload_too_large"


async def test_streamed_body_over_the_limit_raises_413_from_receive():
    svc = fake_service(max_body_mb=0.001)
    seen = []

    async def reader(scope, receive, send):
        try:
            while (await receive()).get("more_body"):
                pass
        except PayloadTooLarge as exc:
            seen.append(exc)
            raise

    scope = {"type": "http", "method": "POST", "path": "/predict/digits", "headers": []}

    async def receive():
        return {"type": "http.request", "body": b"x" * 600, "more_body": True}

    async def send(message):
        pass

    with pytest.raises(PayloadTooLarge):
        await Edge(reader, svc)(scope, receive, send)
    assert len(seen) == 1


# -- the loop-lag meter ----------------------------------------------------------------------------
async def _late_tick(lag: LoopLag, block_s: float) -> None:
    """Block the loop for ``block_s``, then let the overdue tick run (it records its lateness)."""
    time.sleep(block_s)
    for _ in range(3):
        await asyncio.sleep(0)
        if lag.lag > 0.1:
            return


async def test_loop_lag_sees_a_blocked_loop_and_forgives_one_stall():
    lag = LoopLag(interval=0.01)
    lag.start()
    try:
        await asyncio.sleep(0.05)
        assert lag.current(time.monotonic()) < 0.05
        time.sleep(0.2)  # the loop is blocked: the pending tick is overdue
        assert lag.current(time.monotonic()) > 0.15
        await _late_tick(lag, 0.0)  # the tick runs late and records it
        assert lag.lag > 0.1
        assert lag.current(time.monotonic()) < 0.05  # one stall, over: not overload
        await _late_tick(lag, 0.2)  # a second late tick in a row: sustained
        assert lag.current(time.monotonic()) > 0.1
        await asyncio.sleep(0.05)  # on time again
        assert lag.current(time.monotonic()) < 0.05
    finally:
        lag.stop()


# -- top-k -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes", [3, 10, 129, 1000])
@pytest.mark.parametrize("k", [1, 2, 5, 50, 2000])
def test_top_indices_equals_a_stable_argsort(classes, k):
    rng = np.random.default_rng(classes * 7 + k)
    for _ in range(20):
        p = rng.integers(0, 6, size=(4, classes)).astype(np.float32) / 5  # many ties, at the boundary too
        want = np.argsort(-p, axis=1, kind="stable")[:, : min(k, classes)]
        np.testing.assert_array_equal(top_indices(p, k), want)
    p = rng.random((3, classes))
    np.testing.assert_array_equal(top_indices(p, k), np.argsort(-p, axis=1, kind="stable")[:, :k])


# -- the whole app on a fake engine ----------------------------------------------------------------
async def test_app_sheds_before_routing_and_answers_a_computing_request_504():
    """max_inflight 1: while one request computes (engine blocked), another is shed 429 without its
    body being read; the computing one answers 504 at its deadline, not when the engine finishes."""
    engine = FakeEngine()
    app = create_app(Settings(bundle="unused", max_inflight=1, timeout_ms=300, max_wait_ms=0), engine=engine)
    async with app.router.lifespan_context(app):
        await app.state.service.wait_ready()
        engine.gate.clear()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            data = [0.0] * (3 * 32 * 32)
            req = {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": data}]}
            t0 = time.perf_counter()
            first = asyncio.ensure_future(client.post("/v2/models/digits/infer", json=req))
            while not engine.calls and not app.state.service.batcher._in_flight:
                await asyncio.sleep(0.005)
            shed = await call(app, "/predict/digits")
            assert_shed(*shed)
            r = await first
            took = time.perf_counter() - t0
            engine.gate.set()
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
        assert took < 1.0, took
        text = app.state.service.metrics.render().decode()
        assert 'mtserve_requests_total{code="429",task="digits"} 1.0' in text
        assert 'mtserve_requests_total{code="504",task="digits"} 1.0' in text


async def test_lean_path_answers_a_queued_request_504_at_its_deadline_and_never_computes_it():
    """Behind a blocked batch, a queued /v2 request answers 504 at its deadline (the lean path's one
    timer cancels it; the batcher holds no timer of its own) and its rows are never computed; the
    request's task is left uncancelled (a later request on the same app answers 200)."""
    engine = FakeEngine()
    app = create_app(Settings(bundle="unused", timeout_ms=300, max_wait_ms=0), engine=engine)
    async with app.router.lifespan_context(app):
        await app.state.service.wait_ready()
        engine.gate.clear()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            x = {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}
            body = {"inputs": [x]}
            first = asyncio.ensure_future(client.post("/v2/models/digits/infer", json=body))
            while not app.state.service.batcher._in_flight:
                await asyncio.sleep(0.005)
            t0 = time.perf_counter()
            queued = await client.post("/v2/models/animals/infer", json=body)
            took = time.perf_counter() - t0
            engine.gate.set()
            await first
            after = await client.post("/v2/models/animals/infer", json=body)
    assert queued.status_code == 504 and queued.json()["error"]["code"] == "deadline_exceeded", queued.text
    assert 0.2 < took < 1.0, took
    assert after.status_code == 200, after.text
    computed = [t for call in engine.calls for t in call]
    assert computed.count("animals") == 1, engine.calls  # the later request only, never the expired one
