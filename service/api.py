"""Routes of DESIGN.md §5 (except /v2): thin: decode/validate, enqueue, await, answer.

``POST /predict/{task}`` is answered by the lean path (service/hot_path.py) in front of FastAPI; the
FastAPI route here documents it in OpenAPI and answers what the lean path leaves to FastAPI.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from service.inputs import read_images
from service.postprocess import top_k
from service.schemas import ErrorResponse, PredictResponse, TaskInfo, TaskList
from service.server_state import Service

router = APIRouter()
ERRORS = {c: {"model": ErrorResponse} for c in (404, 413, 415, 422, 429, 503, 504)}


def svc(request: Request) -> Service:
    return request.app.state.service


def task_info(s: Service, name: str) -> TaskInfo:
    spec = s.task(name)
    shared = [seg.name for seg in s.manifest.segments if seg.shared]
    return TaskInfo(
        name=name,
        labels=list(spec.labels),
        num_classes=len(spec.labels),
        input=s.manifest.input.model_dump(),
        variants=dict(spec.variants),
        shared_segments=shared,
    )


PREDICT_BODY = {
    "requestBody": {
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictJSON"}},
        }
    }
}


async def predict_answer(s: Service, request: Request, task: str, query_k: int | None) -> bytes:
    """The ``/predict/{task}`` answer as JSON bytes (orjson): for the FastAPI route below and for the
    lean path in front of it (service/hot_path.py), which answer identically."""
    with s.acquire(task) as model:  # the version that answers, whatever reloads happen meanwhile
        deadline = s.deadline(request)
        blobs, json_k = await read_images(request, s.settings.max_images_per_request)
        pre = s.preprocess
        if (x := pre.inline(blobs)) is None:  # one small image: decoded here, no coroutine
            x = await pre(blobs)
        probs = await model.infer(task, x, request, deadline)
    k = query_k or json_k or s.settings.top_k
    labels = model.task(task).labels
    predictions = [{"top_k": top_k(p, labels, k)} for p in probs]
    return orjson.dumps({"task": task, "model_version": model.version, "predictions": predictions})


@router.post("/predict/{task}", response_model=PredictResponse, responses=ERRORS, openapi_extra=PREDICT_BODY)
async def predict(
    request: Request, task: str, top_k_: int | None = Query(None, alias="top_k", ge=1)
) -> Response:
    """Classify one or several images for one task: raw image body, multipart ``file`` parts, or JSON."""
    return Response(await predict_answer(svc(request), request, task, top_k_), media_type="application/json")


@router.get("/tasks", response_model=TaskList)
async def tasks(request: Request) -> TaskList:
    s = svc(request)
    m = s.manifest
    return TaskList(bundle=m.name, version=m.version, plan=m.plan, tasks=[task_info(s, t) for t in m.tasks])


@router.get("/tasks/{task}", response_model=TaskInfo, responses={404: {"model": ErrorResponse}})
async def task(request: Request, task: str) -> TaskInfo:
    return task_info(svc(request), task)


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 once the bundle is loaded and every variant warmed up; 503 before and while draining."""
    s = svc(request)
    body = {
        "status": "ready" if s.ready and not s.draining else ("draining" if s.draining else "loading"),
        "bundle": s.manifest.name,
        "version": s.manifest.version,
        "device": s.settings.device,
        "providers": s.engine.providers,
    }
    if describe := getattr(s.engine, "describe", None):  # buckets, graphs, start-up time, memory held
        body["engine"] = describe()
    if s.failed:
        body["status"] = "failed"
    if body["status"] != "ready":
        body["error"] = {"code": "not_ready", "message": s.failed or body["status"]}
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(svc(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
