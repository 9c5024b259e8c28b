"""Reading a request's images: raw body, multipart files, JSON base64 (body limit: service/outer_layer.py)."""

from __future__ import annotations

import base64
import binascii
import re

import orjson
from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from contract.errors import ClientClosed, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.outer_layer import raw_header
from service.schemas import PredictJSON

RAW_TYPES = ("image/", "application/octet-stream")
_JSON_KEYS = frozenset(PredictJSON.model_fields)
_DATA_URL = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.ASCII)


def b64decode(text: str, what: str = "image") -> bytes:
    text = _DATA_URL.sub("", text.strip(), count=1)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what}: not valid base64") from None


async def read_body(request: Request) -> bytes:
    """The whole body, as ``await request.body()`` returns it (and caches it for a later call), read
    straight from ``receive``: Starlette's ``body()`` iterates an async generator, which asyncio
    registers and finalises per request. 499 if the client leaves while sending it."""
    if hasattr(request, "_body"):
        return request._body
    chunks = []
    while True:
        message = await request.receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientClosed("client disconnected while sending the body")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = request._body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return body


def header(request: Request, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), read from the raw ASGI headers: Starlette's
    ``request.headers`` builds an object for it."""
    value = raw_header(request.scope["headers"], name)
    return None if value is None else value.decode("latin-1")


def media_type(request: Request) -> str:
    """The request's media type, lower case, without parameters ("" when none)."""
    value = header(request, b"content-type")
    return "" if value is None else value.split(";")[0].strip().lower()


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


def _plain(doc) -> bool:
    """A body :class:`PredictJSON` takes as it is: known keys, strings, a positive int ``top_k``."""
    if type(doc) is not dict or not doc.keys() <= _JSON_KEYS:
        return False
    image, images, k = doc.get("image"), doc.get("images"), doc.get("top_k")
    return (
        (image is None or type(image) is str)
        and (images is None or (type(images) is list and all(type(t) is str for t in images)))
        and (k is None or (type(k) is int and k >= 1))
    )


def read_json(body: bytes) -> tuple[list[str], int | None]:
    """The base64 texts and ``top_k`` of a JSON ``/predict`` body. orjson reads it; what is not a plain
    body for :class:`PredictJSON` (or not strict UTF-8 JSON for orjson) is read by pydantic, whose
    answer (coercions, the 422 message) is the one given."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if _plain(doc):
        image, images = doc.get("image"), doc.get("images")
        return ([image] if image is not None else []) + (images or []), doc.get("top_k")
    try:
        m = PredictJSON.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidInput(f"JSON body: {loc}: {first['msg']}") from None
    return ([m.image] if m.image is not None else []) + (m.images or []), m.top_k


async def read_images(request: Request, limit: int) -> tuple[list[bytes], int | None]:
    """The encoded images of a /predict request and the JSON body's ``top_k`` if any.

    415 for another media type, 422 for malformed bodies, 413 over ``limit`` images.
    """
    kind = media_type(request)
    top_k = None
    if kind.startswith(RAW_TYPES):
        return [await read_body(request)], None  # one image (limit >= 1: Settings)
    if kind == "multipart/form-data":
        blobs = await _multipart(request, limit)
    elif kind == "application/json" or kind.endswith("+json"):
        texts, top_k = read_json(await read_body(request))
        _check_count(len(texts), limit)
        blobs = [b64decode(t, f"images[{i}]") for i, t in enumerate(texts)]
    else:
        raise UnsupportedMediaType(
            f"media type {kind or '(none)'!r}: send image/jpeg, image/png, image/webp, "
            "multipart/form-data with file parts, or application/json with image/images (base64)"
        )
    _check_count(len(blobs), limit)
    return blobs, top_k
