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

import asyncio
import re
import time

from starlette.exceptions import HTTPException
from starlette.requests import Request

from service import api, errors, oip
from service.admission import DEADLINE
from service.errors import send_error
from service.outer_layer import OuterLayer, content_length
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
    """ASGI, the outermost layer: a plain inference request is answered here whole (the outer layer's
    door: 413, 429; one deadline timer; the route's answer; the send), everything else goes to
    ``outer`` (:class:`~service.outer_layer.OuterLayer` around FastAPI's stack), unchanged.

    Whole, because every layer a request passes costs the event loop at each of its suspensions (a
    coroutine frame resumed per layer), and a generic layer needs more: ``asyncio.timeout`` (an object,
    a reschedule when answering), a ``send`` wrapper to learn the status, a ``receive`` wrapper for
    the body limit. Here the status is known, the deadline is one ``call_later`` that cancels the
    request's task (504 then, as the outer layer answers it), and the body limit needs no wrapper
    when ``Content-Length`` is declared (the door checked it; the server reads no more than it).
    """

    def __init__(self, outer: OuterLayer, service: Service):
        self.outer = outer
        self.service = service
        self.admission = outer.admission
        self.metrics = outer.metrics
        self.timeout = outer.timeout

    @staticmethod
    def route(scope) -> tuple | None:
        """(answer function, its arguments) of a plain inference request, else None (FastAPI's)."""
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            path = scope["path"]
            if path.startswith(PREDICT):
                if (target := predict_target(path, scope.get("query_string", b""))) is not None:
                    return api.predict_answer, target
            elif path.startswith(V2) and (target := infer_target(path)) is not None:
                return oip.infer_answer, target
        return None

    async def __call__(self, scope, receive, send) -> None:
        if (route := self.route(scope)) is not None:
            return await self.serve(scope, receive, send, *route)
        await self.outer(scope, receive, send)

    async def serve(self, scope, receive, send, answer, target: tuple) -> None:
        """The outer layer's inference branch and the route in one frame (same answers, same metrics)."""
        t0 = time.perf_counter()
        now = time.monotonic()
        outer = self.outer
        status = 500
        length = content_length(scope["headers"])
        if (refused := outer.refusal(scope, now, length)) is not None:
            try:
                status = refused[0]
                await send_error(send, *refused)
            finally:
                self._count(target[0], status, t0)
            return
        admission = self.admission
        admission.inflight += 1
        scope[DEADLINE] = now + self.timeout
        me = asyncio.current_task()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            me.cancel()

        timer = me.get_loop().call_later(self.timeout, expire)
        if length is None:
            receive = outer.limited(receive)  # a streamed body: 413 once it grows past the limit
        request = Request(scope, receive)
        try:
            try:
                body = await answer(self.service, request, *target)
            except asyncio.CancelledError:
                if not expired:
                    raise
                me.uncancel()
                status = outer._status_504
                await outer.deadline_answer(send)
                return
            except Exception as exc:  # answered by FastAPI's handler for its type (service/errors.py)
                timer.cancel()
                http = isinstance(exc, HTTPException)
                response = await (errors.handle_http if http else errors.handle)(request, exc)
                status = response.status_code
                await response(scope, receive, send)
                if status == 500 and not http:  # as Starlette's ServerErrorMiddleware: answered, raised
                    raise
                return
            timer.cancel()  # answering: not interrupted any more
            status = 200
            await send_json(send, body)
        finally:
            timer.cancel()
            admission.inflight -= 1
            self._count(target[0], status, t0)

    def _count(self, task: str, status: int, t0: float) -> None:
        if task in self.metrics.tasks:
            self.metrics.count_request(task, status, time.perf_counter() - t0)
