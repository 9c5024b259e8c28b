"""Open Inference Protocol v2 (KServe v2 / Triton HTTP): health, metadata, ready, infer.

A model is a task. Inputs: ``input`` FP32 ``[N, 3, H, W]`` already preprocessed, or ``image``
BYTES ``[N]`` of encoded images (base64 or raw strings in JSON; length-prefixed in Triton's binary
tensor extension). Output ``probabilities`` FP32 ``[N, C]``; with the ``classification``
parameter, BYTES ``[N, k]`` of ``"score:index:label"`` strings, the way Triton does.
"""

from __future__ import annotations

import json
import math
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from contract.errors import InvalidInput, NotReady, PayloadTooLarge, UnknownTask
from service.api import ERRORS, svc
from service.inputs import b64decode, header, read_body
from service.postprocess import v2_outputs
from service.schemas import V2InferRequest, V2InferResponse, V2ModelMetadata, V2ServerMetadata
from service.server_state import Service

router = APIRouter(prefix="/v2", tags=["v2"])
HEADER_LENGTH = "inference-header-content-length"
HEADER_LENGTH_KEY = HEADER_LENGTH.encode()
JSON = "application/json"
INPUTS = {"input": "FP32", "image": "BYTES"}  # the model metadata's inputs: name -> datatype


def _version() -> str:
    try:
        return version("mtserve")
    except PackageNotFoundError:
        return "0"


def _check_version(s: Service, task: str, model_version: str | None) -> None:
    if model_version is not None and model_version != s.manifest.version:
        raise UnknownTask(f"model {task!r} has no version {model_version!r}; it has {s.manifest.version!r}")


class Tensor:
    """An input tensor of a request (the attributes of :class:`V2Tensor`, without pydantic)."""

    __slots__ = ("data", "datatype", "name", "parameters", "shape")

    def __init__(self, d: dict):
        self.name, self.shape, self.datatype = d["name"], d["shape"], d["datatype"]
        self.parameters, self.data = d.get("parameters"), d.get("data")


class Output:
    """A requested output (the attributes of :class:`V2RequestedOutput`)."""

    __slots__ = ("name", "parameters")

    def __init__(self, d: dict):
        self.name, self.parameters = d["name"], d.get("parameters")


class InferRequest:
    """A request's ``id``, ``inputs`` and ``outputs`` (the attributes of :class:`V2InferRequest`)."""

    __slots__ = ("id", "inputs", "outputs")

    def __init__(self, d: dict):
        self.id = d.get("id")
        self.inputs = [Tensor(t) for t in d["inputs"]]
        outputs = d.get("outputs")
        self.outputs = None if outputs is None else [Output(o) for o in outputs]


def _str(v) -> bool:
    return type(v) is str


def _opt_dict(d: dict, key: str) -> bool:
    v = d.get(key)
    return v is None or type(v) is dict


def _plain_tensor(t) -> bool:
    return (
        type(t) is dict
        and _str(t.get("name"))
        and _str(t.get("datatype"))
        and type(shape := t.get("shape")) is list
        and all(type(v) is int for v in shape)
        and _opt_dict(t, "parameters")
    )


def _plain(doc) -> bool:
    """Whether ``doc`` is a request pydantic would take as it is (no coercion, no error): then the
    fields are read without building the models; anything else goes through :class:`V2InferRequest`."""
    if type(doc) is not dict or not _opt_dict(doc, "parameters"):
        return False
    if (i := doc.get("id")) is not None and not _str(i):
        return False
    inputs, outputs = doc.get("inputs"), doc.get("outputs")
    if type(inputs) is not list or not inputs or not all(_plain_tensor(t) for t in inputs):
        return False
    return outputs is None or (
        type(outputs) is list
        and all(type(o) is dict and _str(o.get("name")) and _opt_dict(o, "parameters") for o in outputs)
    )


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest | V2InferRequest, bytes]:
    """The JSON header (the whole body unless the binary tensor extension is used) and the binary part."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInput(f"{HEADER_LENGTH}: {header_length!r} does not fit a body of {len(body)} bytes")
        body, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if _plain(doc):  # orjson read it, and it is plain as read (a huge int would not be)
        return InferRequest(doc), binary
    try:  # the rest as before: the stdlib's reading (NaN, UTF-16, ints past 64 bits...), then pydantic
        doc = json.loads(body)
        return (InferRequest(doc) if _plain(doc) else V2InferRequest.model_validate(doc)), binary
    except (ValueError, ValidationError, RecursionError) as exc:  # RecursionError: [[[[... nested deep
        raise InvalidInput(f"inference request: {(str(exc).splitlines() or ['invalid JSON'])[0]}") from None


def _bytes_elements(raw: bytes) -> list[bytes]:
    """Triton's BYTES serialisation: each element a 4-byte little-endian length, then the bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidInput("BYTES tensor: truncated length prefix")
        n = int.from_bytes(raw[i : i + 4], "little")
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    if i != len(raw):
        raise InvalidInput("BYTES tensor: truncated element")
    return out


def _flatten(data) -> list:
    if not isinstance(data, list):
        raise InvalidInput("BYTES tensor: data must be a list")
    out = []
    for d in data:
        out.extend(_flatten(d) if isinstance(d, list) else [d])
    return out


def read_input(
    s: Service, req: InferRequest | V2InferRequest, binary: bytes
) -> tuple[np.ndarray | None, list[bytes]]:
    """(preprocessed tensor, None) for FP32, (None, encoded images) for BYTES; 422/413 otherwise."""
    if len(req.inputs) != 1:
        raise InvalidInput(f"expected one input ('input' FP32 or 'image' BYTES), got {len(req.inputs)}")
    t = req.inputs[0]
    if INPUTS.get(t.name) != t.datatype:
        raise InvalidInput(
            f"input {t.name!r} {t.datatype}: the inputs are 'input' FP32 [N, 3, H, W] and 'image' BYTES [N]"
        )
    size = (t.parameters or {}).get("binary_data_size")
    raw = None
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise InvalidInput(f"input {t.name!r}: binary_data_size {size!r} does not fit the binary data")
        raw = binary[:size]
    limit = s.settings.max_images_per_request
    n = t.shape[0] if t.shape else 0
    if n > limit:
        raise PayloadTooLarge(f"{n} images in one request; the limit is {limit}")
    if n < 1:
        raise InvalidInput(f"input {t.name!r}: shape {t.shape} has no rows")
    if t.datatype == "FP32":
        want = [n, *s.manifest.input.size]
        if list(t.shape) != want:
            raise InvalidInput(f"input {t.name!r}: shape {t.shape}, expected {want}")
        try:
            x = np.frombuffer(raw, "<f4") if raw is not None else np.asarray(t.data, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"input {t.name!r}: data is not an FP32 tensor ({exc})") from None
        if x.size != math.prod(want):
            raise InvalidInput(f"input {t.name!r}: {x.size} values for shape {want}")
        x = x.reshape(want).astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise InvalidInput(f"input {t.name!r}: NaN or infinite values")
        return np.ascontiguousarray(x), []
    if t.datatype == "BYTES":
        if raw is not None:
            blobs = _bytes_elements(raw)
        else:
            items = _flatten(t.data)
            if not all(isinstance(v, str) for v in items):
                raise InvalidInput(f"input {t.name!r}: BYTES data must be strings")
            blobs = [_decode_string(v) for v in items]
        if len(blobs) != math.prod(t.shape) or len(blobs) != n:
            raise InvalidInput(
                f"input {t.name!r}: {len(blobs)} elements for shape {t.shape}; use [N] or [N, 1]"
            )
        return None, blobs
    raise InvalidInput(f"input {t.name!r}: datatype {t.datatype!r} unsupported; use FP32 or BYTES")


def _decode_string(v: str) -> bytes:
    """A BYTES element in JSON: base64 (data: URLs too); failing that, the string's own bytes."""
    try:
        return b64decode(v)
    except InvalidInput:
        pass
    try:
        return v.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800") that stands for no byte
        raise InvalidInput("BYTES element: neither base64 nor encodable text") from None


def requested_outputs(req: InferRequest | V2InferRequest) -> list[int | None]:
    """Per requested output: its ``classification`` k, or None for the full FP32 tensor (checked
    before anything is computed)."""
    plan: list[int | None] = []
    for o in req.outputs or [None]:
        if o is not None and o.name != "probabilities":
            raise InvalidInput(f"unknown output {o.name!r}; the output is 'probabilities'")
        k = (o.parameters or {}).get("classification") if o is not None else None
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise InvalidInput(f"output parameter classification must be a positive integer, got {k!r}")
        plan.append(k)
    return plan


@router.get("/health/live")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", responses=ERRORS)
async def ready(request: Request) -> dict:
    svc(request).admit()
    return {"ready": True}


@router.get("", response_model=V2ServerMetadata)
async def server_metadata() -> V2ServerMetadata:
    return V2ServerMetadata(
        name="mtserve", version=_version(), extensions=["classification", "binary_tensor_data"]
    )


@router.get("/models/{task}", response_model=V2ModelMetadata, responses=ERRORS)
@router.get("/models/{task}/versions/{model_version}", response_model=V2ModelMetadata, responses=ERRORS)
async def model_metadata(request: Request, task: str, model_version: str | None = None) -> V2ModelMetadata:
    s = svc(request)
    spec = s.task(task)
    _check_version(s, task, model_version)
    return V2ModelMetadata(
        name=task,
        versions=[s.manifest.version],
        platform="onnxruntime_onnx",
        inputs=[
            {"name": "input", "datatype": "FP32", "shape": [-1, *s.manifest.input.size]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ],
        outputs=[{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(spec.labels)]}],
    )


@router.get("/models/{task}/ready", responses=ERRORS)
@router.get("/models/{task}/versions/{model_version}/ready", responses=ERRORS)
async def model_ready(request: Request, task: str, model_version: str | None = None) -> dict:
    s = svc(request)
    s.task(task)
    _check_version(s, task, model_version)
    if not s.ready or s.draining:
        raise NotReady(s.failed or ("draining" if s.draining else "loading"))
    return {"name": task, "ready": True}


INFER_BODY = {
    "requestBody": {
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "Triton binary tensor extension: JSON header, then the bytes",
            },
        }
    }
}


@router.post(
    "/models/{task}/infer", response_model=V2InferResponse, responses=ERRORS, openapi_extra=INFER_BODY
)
@router.post(
    "/models/{task}/versions/{model_version}/infer",
    response_model=V2InferResponse,
    responses=ERRORS,
    openapi_extra=INFER_BODY,
)
async def infer(request: Request, task: str, model_version: str | None = None) -> Response:
    """Classify an FP32 tensor (preprocessed) or BYTES encoded images for one task."""
    return Response(await infer_answer(svc(request), request, task, model_version), media_type=JSON)


async def infer_answer(s: Service, request: Request, task: str, model_version: str | None) -> bytes:
    """The infer answer as JSON bytes (orjson): for the FastAPI routes above and for the lean path in
    front of them (service/hot_path.py), which answer identically."""
    with s.acquire(task, model_version) as model:  # the version that computes the answer
        deadline = s.deadline(request)
        req, binary = parse_request(await read_body(request), header(request, HEADER_LENGTH_KEY))
        x, blobs = read_input(s, req, binary)
        plan = requested_outputs(req)
        if x is None:
            x = await s.preprocess(blobs)
        probs = await model.infer(task, x, request, deadline)
    outputs = v2_outputs(plan, probs, model.task(task).labels)
    return orjson.dumps(
        {"model_name": task, "model_version": model.version, "id": req.id, "outputs": outputs}
    )
