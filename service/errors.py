"""The ONE table mapping error types (:mod:`contract.errors`, which know no HTTP) to HTTP statuses.

Routes never catch: they raise those types, and the handlers installed by :func:`install` answer
``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract.errors import (
    BundleError,
    ClientClosed,
    Conflict,
    DeadlineExceeded,
    Forbidden,
    IncompatibleBundle,
    InvalidInput,
    NotReady,
    PayloadTooLarge,
    QueueFull,
    Unauthorized,
    UnknownTask,
    UnsupportedMediaType,
)

log = logging.getLogger("mtserve")


# exception type -> (HTTP status, error code). The first matching class (in MRO order) wins.
STATUS: dict[type[BaseException], tuple[int, str]] = {
    UnknownTask: (404, "unknown_task"),
    UnsupportedMediaType: (415, "unsupported_media_type"),
    InvalidInput: (422, "invalid_input"),
    RequestValidationError: (422, "invalid_input"),
    PayloadTooLarge: (413, "payload_too_large"),
    QueueFull: (429, "queue_full"),
    DeadlineExceeded: (504, "deadline_exceeded"),
    NotReady: (503, "not_ready"),
    ClientClosed: (499, "client_closed_request"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    Conflict: (409, "conflict"),
    IncompatibleBundle: (409, "incompatible_bundle"),
    BundleError: (422, "invalid_bundle"),  # raised by routes only for POST /admin/reload
}


def status_of(exc: BaseException) -> tuple[int, str]:
    """The status and code for an exception; anything unexpected is a 500 ``internal``."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500, "internal"


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def send_error(
    send, status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """The same JSON error answered straight over ASGI (the outermost layer's 413/429/504, before
    FastAPI is reached: no Response object, no routing)."""
    error = {"error": {"code": code, "message": message}}
    body = json.dumps(error, ensure_ascii=False, separators=(",", ":")).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def _message(exc: BaseException) -> str:
    if isinstance(exc, RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(p) for p in e.get("loc", ()))
            parts.append(f"{loc}: {e.get('msg', '')}")
        return "; ".join(parts) or "invalid request"
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


async def handle(request: Request, exc: Exception) -> JSONResponse:
    status, code = status_of(exc)
    if status == 500:
        log.exception("unexpected error on %s", request.url.path, exc_info=exc)
        return error_response(500, "internal", "internal error")
    return error_response(status, code, _message(exc), getattr(exc, "headers", None))


async def handle_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (404 route not found, 405 ...) in the same JSON shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


def install(app: FastAPI) -> None:
    """Register the handlers: one for the table above, one for Starlette's HTTP errors, one catch-all."""
    for cls in STATUS:
        app.add_exception_handler(cls, handle)
    app.add_exception_handler(StarletteHTTPException, handle_http)
    app.add_exception_handler(Exception, handle)
