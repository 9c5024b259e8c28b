"""The lean request path: ``POST /predict/{task}`` and ``POST /v2/models/{task}[/versions/{v}]/infer``
answered straight over ASGI, in front of FastAPI's middleware stack, router and parameter solving.

Per request that saves what FastAPI and Starlette would build and run around the same work: the error
and telemetry middleware layers, the route table scan, the ``Request``/``Response`` wrappers, the
dependency solving of the query parameters, the response model's validation and serialisation. The
work itself is the same code the FastAPI routes run (:func:`service.api.predict_answer`,
:func:`service.oip.infer_answer`, answers encoded with orjson), and errors are answered by the same
handlers as FastAPI's (:mod:`service.errors`), so a request answers identically on either path.

What is not a plain case goes to FastAPI unchanged: another method, a path that does not match,
a ``root_path`` (a mounted app), a ``/predict`` query string other than empty or ``top_k=N``. The
FastAPI routes stay declared, so OpenAPI documents them and they answer those cases.
"""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.requests import Request

from service import api, errors, oip
from service.server_state import Service

PREDICT = "/predict/"
V2 = "/v2/models/"
INFER = "/infer"
_TOP_K = re.compile(rb"top_k=([1-9][0-9]{0,8})")  # what FastAPI reads as the same int, and only that
JSON_HEADERS = b"application/json"


async def send_json(send, body: bytes, status: int = 200) -> None:
    """The answer as Starlette's ``JSONResponse`` sends it (same headers, same order)."""
    head = [(b"content-length", b"%d" % len(body)), (b"content-type", JSON_HEADERS)]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def predict_target(path: str, query: bytes) -> tuple[str, int | None] | None:
    """(task, the query's top_k) of a plain ``/predict/{task}`` request, else None."""
    task = path[len(PREDICT) :]
    if not task or "/" in task:
        return None
    if not query:
        return task, None
    m = _TOP_K.fullmatch(query)
    return (task, int(m[1])) if m else None


def infer_target(path: str) -> tuple[str, str | None] | None:
    """(task, model version or None) of a ``/v2/models/{task}[/versions/{v}]/infer`` path, else None."""
    if not path.endswith(INFER) or len(path) <= len(V2) + len(INFER):
        return None
    parts = path[len(V2) : -len(INFER)].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


class HotPaths:
    """ASGI: the inference routes answered here, everything else by ``app`` (FastAPI's stack)."""

    def __init__(self, app, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            path = scope["path"]
            if path.startswith(PREDICT):
                if (target := predict_target(path, scope["query_string"])) is not None:
                    request = Request(scope, receive)
                    answer = api.predict_answer(self.service, request, *target)
                    return await self._answer(request, answer, send)
            elif path.startswith(V2) and (target := infer_target(path)) is not None:
                request = Request(scope, receive)
                answer = oip.infer_answer(self.service, request, *target)
                return await self._answer(request, answer, send)
        await self.app(scope, receive, send)

    @staticmethod
    async def _answer(request: Request, answer, send) -> None:
        """Await the route's answer (bytes of JSON) and send it; an error is answered the way FastAPI's
        exception layers answer it: the handler registered for its type; an unexpected one (500) is
        answered by the catch-all handler and raised again (as Starlette's ServerErrorMiddleware does)."""
        try:
            body = await answer
        except HTTPException as exc:
            response = await errors.handle_http(request, exc)
            await response(request.scope, request.receive, send)
            return
        except Exception as exc:
            response = await errors.handle(request, exc)
            await response(request.scope, request.receive, send)
            if response.status_code == 500:
                raise
            return
        await send_json(send, body)
