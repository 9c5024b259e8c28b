"""The wire between the API processes and the engine process (``--workers N``, docs/server.md).

One Unix socket connection per API process to the engine process (:mod:`service.channel`). A message
is a msgpack header (a tagged :class:`msgspec.Struct`), followed for tensors by the raw bytes of
little-endian float32 in C order (written from the array's memory, read as a view of the bytes
received). Nothing is pickled.

API -> engine: :class:`Infer` (+ the tensor frame), :class:`Cancel`, :class:`Call` (reload, ...).
Engine -> API: :class:`Result` (+ the probabilities frame), :class:`Failure`, :class:`Reply`.

Errors cross the wire by their :mod:`contract.errors` class name, so an API process raises the same
exception (and answers the same status) as the engine would have in one process.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np

from contract import errors

DTYPE = np.dtype("<f4")


class Infer(msgspec.Struct, tag="infer", array_like=True):
    """Rows of one request (preprocessed, ``shape`` = [n, C, H, W]); the tensor is the next frame."""

    id: int
    task: str
    gen: int  # the engine's model generation the request was admitted to (docs: live reload)
    deadline: float  # CLOCK_MONOTONIC (time.monotonic(), system-wide on Linux)
    shape: tuple[int, ...]


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    """The client left (or the API answered 504): abandon the job if it has not started computing."""

    id: int


class Call(msgspec.Struct, tag="call", array_like=True):
    """An admin call forwarded to the engine: ``method`` in ENGINE_CALLS."""

    id: int
    method: str
    arg: str | None = None
    allow_remove: bool = False  # reload: the new version may drop served tasks (issue 14)


class Result(msgspec.Struct, tag="result", array_like=True):
    """The probabilities [n, C] of one request; the tensor is the next frame."""

    id: int
    version: str
    shape: tuple[int, ...]


class Failure(msgspec.Struct, tag="failure", array_like=True):
    id: int
    kind: str  # a contract.errors class name; anything else is an internal error
    message: str


class Reply(msgspec.Struct, tag="reply", array_like=True):
    id: int
    data: dict


ToEngine = Infer | Cancel | Call
ToApi = Result | Failure | Reply
ENGINE_CALLS = ("reload",)

_encoder = msgspec.msgpack.Encoder()
_to_engine = msgspec.msgpack.Decoder(ToEngine)
_to_api = msgspec.msgpack.Decoder(ToApi)

# errors that may cross the wire; their constructors take the message alone
KINDS: dict[str, type[errors.ServiceError]] = {
    cls.__name__: cls
    for cls in (
        errors.UnknownTask,
        errors.InvalidInput,
        errors.PayloadTooLarge,
        errors.QueueFull,
        errors.DeadlineExceeded,
        errors.NotReady,
        errors.ClientClosed,
        errors.Forbidden,
        errors.Conflict,
        errors.IncompatibleBundle,
    )
}


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_to_engine(data) -> ToEngine:
    return _to_engine.decode(data)


def decode_to_api(data) -> ToApi:
    return _to_api.decode(data)


def tensor_frame(x: np.ndarray) -> memoryview:
    """A zero-copy view of ``x`` as float32 C-order bytes (a copy only if it is not already)."""
    return memoryview(np.ascontiguousarray(x, dtype=DTYPE)).cast("B")


def tensor_of(buffer, shape: tuple[int, ...]) -> np.ndarray:
    """The array over a received frame's buffer (no copy; read-only)."""
    x = np.frombuffer(buffer, dtype=DTYPE)
    if x.size != math.prod(shape):
        raise errors.InvalidInput(f"tensor frame of {x.size} values for shape {list(shape)}")
    return x.reshape(shape)


def failure_of(request_id: int, exc: BaseException) -> Failure:
    kind = type(exc).__name__
    if isinstance(exc, errors.BundleError):
        kind = "BundleError"
    elif kind not in KINDS:
        kind = "internal"
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return Failure(request_id, kind, message)


def error_of(failure: Failure) -> Exception:
    """The exception an API process raises for an engine's :class:`Failure`."""
    if failure.kind == "BundleError":
        return errors.BundleError(failure.message)
    cls = KINDS.get(failure.kind)
    if cls is None:
        return RuntimeError(f"engine: {failure.message}")
    return cls(failure.message)
