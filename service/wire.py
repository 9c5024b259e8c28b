"""The wire between the API processes and the engine process (``--workers N``, docs/server.md).

One Unix socket connection per API process to the engine process (:mod:`service.channel`). A message
is a msgpack header (a tagged :class:`msgspec.Struct`), followed for tensors by the raw bytes of
little-endian float32 in C order (written from the arrays' memory, read as views of the bytes
received). Nothing is pickled.

API -> engine: :class:`Hello` (first: which API process, so which arena), :class:`Infer` (+ the rows'
frame, or their offsets in the process's shared-memory arena: service/row_arena.py), :class:`Cancel`,
:class:`Call` (reload, ...).
Engine -> API: :class:`Results` (+ the probabilities' frame), :class:`Failure`, :class:`Reply`.

Requests and answers travel in bulk, as vLLM's engine core sends one message of outputs per step: an
API process sends the requests of one turn of its loop in one :class:`Infer`, the engine the answers
of one turn of its loop (a batch's) to each API process in one :class:`Results`. The engine process is
the one process every request passes through, so its CPU per request bounds the server (with the
per-turn metrics and room: 0.059 -> 0.038 ms per request, docs/bench.md "Fifth session").

Errors cross the wire by their :mod:`contract.errors` class name, so an API process raises the same
exception (and answers the same status) as the engine would have in one process.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np

from contract import errors
from service import row_arena

DTYPE = np.dtype("<f4")


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """An API process's first message: its index (the engine reads its arena's rows by it)."""

    index: int


class Infer(msgspec.Struct, tag="infer", array_like=True):
    """Requests of one API process (preprocessed rows): request ``ids[i]`` has ``rows[i]`` rows of
    ``shape`` ([C, H, W]); the tensor frame holds all of them, request after request, or, with
    ``offsets``, no frame: request ``ids[i]``'s rows are at byte ``offsets[i]`` of the process's arena."""

    ids: list[int]
    tasks: list[str]
    gens: list[int]  # the engine's model generation each was admitted to (docs: live reload)
    deadlines: list[float]  # CLOCK_MONOTONIC (time.monotonic(), system-wide on Linux)
    rows: list[int]
    shape: tuple[int, ...]
    offsets: list[int] | None = None


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    """The client left (or the API answered 504): abandon the job if it has not started computing."""

    id: int


class Call(msgspec.Struct, tag="call", array_like=True):
    """An admin call forwarded to the engine: ``method`` in ENGINE_CALLS."""

    id: int
    method: str
    arg: str | None = None
    allow_remove: bool = False  # reload: the new version may drop served tasks (issue 14)


class Results(msgspec.Struct, tag="results", array_like=True):
    """Answers computed by one version: request ``ids[i]`` gets ``rows[i]`` x ``widths[i]``
    probabilities; the tensor frame holds all of them, request after request."""

    version: str
    ids: list[int]
    rows: list[int]
    widths: list[int]


class Failure(msgspec.Struct, tag="failure", array_like=True):
    id: int
    kind: str  # a contract.errors class name; anything else is an internal error
    message: str


class Reply(msgspec.Struct, tag="reply", array_like=True):
    id: int
    data: dict


ToEngine = Hello | Infer | Cancel | Call
ToApi = Results | Failure | Reply
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


def _split(buffer, sizes: list[int], shapes) -> list[np.ndarray]:
    """Views of ``buffer`` (float32) cut into consecutive arrays of ``sizes`` values, reshaped."""
    x = np.frombuffer(buffer, dtype=DTYPE) if buffer is not None else np.empty(0, DTYPE)
    if x.size != sum(sizes):
        raise errors.InvalidInput(f"tensor frame of {x.size} values for {sum(sizes)}")
    out, at = [], 0
    for size, shape in zip(sizes, shapes, strict=True):
        out.append(x[at : at + size].reshape(shape))
        at += size
    return out


def requests_of(msg: Infer, buffer, arena: np.ndarray | None = None) -> list[np.ndarray]:
    """Each request's rows [n, C, H, W] of an :class:`Infer`, views of its frame or, with offsets, of
    ``arena`` (the sender's, float32); InvalidInput if the lists, the frame or the offsets do not add up."""
    n = len(msg.ids)
    if not (len(msg.tasks) == len(msg.gens) == len(msg.deadlines) == len(msg.rows) == n):
        raise errors.InvalidInput("an inference message whose lists differ in length")
    if any(r <= 0 for r in msg.rows) or any(d <= 0 for d in msg.shape):
        raise errors.InvalidInput(f"rows {msg.rows} of shape {list(msg.shape)}")
    shapes = [(r, *msg.shape) for r in msg.rows]
    if msg.offsets is None:
        row = math.prod(msg.shape)
        return _split(buffer, [r * row for r in msg.rows], shapes)
    if arena is None or buffer is not None or len(msg.offsets) != n:
        raise errors.InvalidInput("rows by offset without an arena, with a frame, or with offsets missing")
    try:
        return [row_arena.rows_at(arena, at, shape) for at, shape in zip(msg.offsets, shapes, strict=True)]
    except ValueError as exc:
        raise errors.InvalidInput(str(exc)) from None


def results_of(msg: Results, buffer) -> list[np.ndarray]:
    """Each request's probabilities [n, C] of a :class:`Results`, views of its frame."""
    shapes = list(zip(msg.rows, msg.widths, strict=True))
    return _split(buffer, [r * w for r, w in shapes], shapes)


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
