"""Reading a request's images: raw body, multipart files, JSON base64 (body limit: service/outer_layer.py)."""

from __future__ import annotations

import base64
import binascii
import re

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from contract.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.schemas import PredictJSON

RAW_TYPES = ("image/", "application/octet-stream")
_DATA_URL = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.ASCII)


def b64decode(text: str, what: str = "image") -> bytes:
    text = _DATA_URL.sub("", text.strip(), count=1)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what}: not valid base64") from None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _check_count(n: int, limit: int) -> None:
    if n == 0:
        raise InvalidInput("no image in the request")
    if n > limit:
        raise PayloadTooLarge(f"{n} images in one request; the limit is {limit}")


async def _multipart(request: Request, limit: int) -> list[bytes]:
    try:
        form = await request.form(max_files=limit + 1, max_fields=limit + 16)
    except HTTPException as exc:  # starlette: malformed multipart, too many files or fields
        if "too many" in str(exc.detail).lower():
            raise PayloadTooLarge(f"multipart: {exc.detail} (limit {limit} images)") from None
        raise InvalidInput(f"multipart: {exc.detail}") from None
    try:
        return [await v.read() for _, v in form.multi_items() if isinstance(v, UploadFile)]
    finally:
        await form.close()


async def read_images(request: Request, limit: int) -> tuple[list[bytes], int | None]:
    """The encoded images of a /predict request and the JSON body's ``top_k`` if any.

    415 for another media type, 422 for malformed bodies, 413 over ``limit`` images.
    """
    kind = media_type(request)
    top_k = None
    if kind.startswith(RAW_TYPES):
        blobs = [await request.body()]
    elif kind == "multipart/form-data":
        blobs = await _multipart(request, limit)
    elif kind == "application/json" or kind.endswith("+json"):
        try:
            body = PredictJSON.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "body"
            raise InvalidInput(f"JSON body: {loc}: {first['msg']}") from None
        texts = ([body.image] if body.image is not None else []) + (body.images or [])
        _check_count(len(texts), limit)
        blobs = [b64decode(t, f"images[{i}]") for i, t in enumerate(texts)]
        top_k = body.top_k
    else:
        raise UnsupportedMediaType(
            f"media type {kind or '(none)'!r}: send image/jpeg, image/png, image/webp, "
            "multipart/form-data with file parts, or application/json with image/images (base64)"
        )
    _check_count(len(blobs), limit)
    return blobs, top_k
