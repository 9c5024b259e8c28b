"""Admin routes: ``GET /admin/model`` and ``POST /admin/reload`` (live reload, docs/server.md).

Mounted only when an admin token is configured (``MTSERVE_ADMIN_TOKEN`` or
``MTSERVE_ADMIN_TOKEN_FILE``); otherwise ``/admin/...`` is a plain 404 like any unknown path.
Every route checks ``Authorization: Bearer <token>`` (constant-time comparison) before it reads
anything else: missing or wrong token 401 with ``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

import hmac
import json
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from contract.errors import InvalidInput, Unauthorized
from service.api import svc
from service.schemas import AdminModel, ErrorResponse, ReloadRequest, ReloadResult

log = logging.getLogger("mtserve")
REALM = 'Bearer realm="mtserve-admin"'
bearer = HTTPBearer(auto_error=False, description="MTSERVE_ADMIN_TOKEN")


def authorize(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    expected = request.app.state.service.settings.admin_token
    if credentials is None:
        raise Unauthorized("admin routes need 'Authorization: Bearer <token>'", {"WWW-Authenticate": REALM})
    given = credentials.credentials.encode("utf-8", "surrogateescape")
    if expected is None or not hmac.compare_digest(given, expected.get_secret_value().encode("utf-8")):
        client = request.client.host if request.client else "?"
        log.warning("admin: invalid token from %s on %s", client, request.url.path)
        raise Unauthorized("invalid admin token", {"WWW-Authenticate": REALM + ', error="invalid_token"'})


ERRORS = {c: {"model": ErrorResponse} for c in (401, 403, 409, 422, 503)}
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(authorize)], responses=ERRORS)


def parse_reload(body: bytes) -> ReloadRequest:
    """The optional JSON body of a reload (an empty body reloads the configured bundle)."""
    if not body.strip():
        return ReloadRequest()
    try:
        return ReloadRequest.model_validate(json.loads(body))
    except (ValueError, ValidationError) as exc:
        raise InvalidInput(f"reload request: {str(exc).splitlines()[0]}") from None


@router.get("/model", response_model=AdminModel)
async def model(request: Request) -> dict:
    """The version served now, where it was loaded from, and whether a reload is running."""
    return svc(request).status()


@router.post(
    "/reload",
    response_model=ReloadResult,
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReloadRequest"}}},
        }
    },
)
async def reload(request: Request) -> dict:
    """Load, verify and warm up a bundle while the current one serves, then swap: requests admitted
    before the swap finish on the old version, later ones run on the new one. One at a time (409)."""
    body = parse_reload(await request.body())
    return await svc(request).reload(body.bundle, allow_remove=body.allow_remove)
