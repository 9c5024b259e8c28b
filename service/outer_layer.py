"""The outermost ASGI layer: load shedding, the request deadline, the body limit, request metrics.

FastAPI's stack (error handlers, routing, parameter solving) costs the event loop far more than a
request that is turned away should, and when the event loop itself is the bottleneck, every
microsecond spent on a rejected request is taken from an admitted one. :class:`OuterLayer` is the first
thing a request meets (``create_app`` wraps FastAPI's whole stack in it), one pure ASGI layer:

- every route: 413 for a declared ``Content-Length`` over ``max_body_mb``; a streamed body growing
  past it raises :class:`PayloadTooLarge` from ``receive`` (inside the route: the error table answers);
- inference routes (``POST /predict/{task}``, ``POST /v2/models/{task}[/versions/{v}]/infer``):

  - shedding: 429 ``queue_full`` with ``Retry-After``, before routing and without reading the body,
    when :class:`~service.admission.Admission` says so: ``max_inflight`` inference requests in flight,
    a full queue, or an event loop late by more than a share of the timeout:
    every admitted request needs several turns of the loop, and a loop that cannot keep up lets requests
    pile up unread in their sockets, where no admission control sees them. uvicorn discards the
    unread body of an answered request and keeps the connection alive;
  - the deadline: ``timeout_ms`` from here. A request not answering by then (reading its body,
    decoding, queued, computing) is cancelled and answered 504 ``deadline_exceeded``;
  - metrics: ``requests_total{task,code}`` and ``request_duration_seconds{task}``, only for tasks of a
    loaded manifest (an unknown task creates no series; it is shed too when overloaded).

Not shed: a server loading or draining answers 503 from the route (shutdown stays ``200`` or ``503``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from contract.errors import DeadlineExceeded, PayloadTooLarge, QueueFull
from service.admission import DEADLINE, Admission
from service.errors import STATUS, send_error
from service.metrics import Metrics, task_of

log = logging.getLogger("mtserve")

LOG_EVERY_S = 10.0  # at most one "shedding" log line per this many seconds
RETRY_AFTER = ((b"retry-after", b"1"),)


def raw_header(headers, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) in ASGI's raw ``headers``, None when absent."""
    for key, value in headers:
        if key == name:
            return value
    return None


def content_length(headers) -> bytes | None:
    """The declared ``Content-Length`` (the first one), None when the body is streamed (chunked)."""
    return raw_header(headers, b"content-length")


class OuterLayer:
    """The ASGI middleware described above; ``app`` is FastAPI's own middleware stack."""

    def __init__(self, app, admission: Admission, metrics: Metrics, max_body_mb: float):
        self.app = app
        self.admission = admission
        self.metrics = metrics
        self.max_body = int(max_body_mb * 1024 * 1024)
        self.timeout = admission.timeout_s
        self.shed = 0  # since the last log line
        self._logged = 0.0
        self._status_429, self._code_429 = STATUS[QueueFull]
        self._status_504, self._code_504 = STATUS[DeadlineExceeded]
        self._status_413, self._code_413 = STATUS[PayloadTooLarge]

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    def _too_large(self, length: bytes | None) -> str | None:
        """Why a declared ``Content-Length`` is refused (413), or None."""
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return f"body of {length.decode('latin-1')} bytes is over the limit of {self.max_body}"
        return None

    def limited(self, receive):
        """``receive`` that raises 413 once the body streamed so far is over the limit."""
        seen = 0
        limit = self.max_body

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"body over the limit of {limit} bytes")
            return message

        limited.inner = receive  # type: ignore[attr-defined]  # for service/client_watch.py
        return limited

    def _log_shed(self, now: float, reason: str) -> None:
        self.shed += 1
        if now - self._logged >= LOG_EVERY_S:
            log.warning("shedding load (%d answered 429 since the last message): %s", self.shed, reason)
            self._logged, self.shed = now, 0

    def refusal(self, scope, now: float, length: bytes | None) -> tuple[int, str, str, tuple] | None:
        """(status, code, message, headers) of an inference request turned away at the door (413 for
        its declared ``length``, 429 when shedding), else None (admit it). Shared with the lean path."""
        if (too_large := self._too_large(length)) is not None:
            return self._status_413, self._code_413, too_large, ()
        reason = self.admission.shed_reason(now) if scope["method"] == "POST" else None
        if reason is not None:
            self._log_shed(now, reason)
            return self._status_429, self._code_429, reason, RETRY_AFTER
        return None

    def deadline_answer(self, send):
        """Send the 504 of a request that did not answer within the deadline."""
        msg = f"no answer within the deadline of {self.timeout * 1e3:.0f} ms"
        return send_error(send, self._status_504, self._code_504, msg)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        task = task_of(scope["path"])
        length = content_length(scope["headers"])
        if task is None:
            if (too_large := self._too_large(length)) is not None:
                return await send_error(send, self._status_413, self._code_413, too_large)
            return await self.app(scope, self.limited(receive), send)

        t0 = time.perf_counter()
        status = 500
        admitted = False
        try:
            now = time.monotonic()
            if (refused := self.refusal(scope, now, length)) is not None:
                status = refused[0]
                await send_error(send, *refused)
                return
            # admitted: answered by its deadline, whatever it is waiting for
            self.admission.inflight += 1
            admitted = True
            scope[DEADLINE] = now + self.timeout
            answered = False
            timeout = asyncio.timeout(self.timeout)

            async def watched(message):
                nonlocal status, answered
                if message["type"] == "http.response.start":
                    status, answered = message["status"], True
                    if not timeout.expired():
                        timeout.reschedule(None)  # answering: not interrupted any more
                await send(message)

            try:
                async with timeout:
                    await self.app(scope, self.limited(receive), watched)
            except TimeoutError:
                if answered or not timeout.expired():
                    raise
                status = self._status_504
                await self.deadline_answer(send)
        finally:
            if admitted:
                self.admission.inflight -= 1
            if task in self.metrics.tasks:
                self.metrics.count_request(task, status, time.perf_counter() - t0)
