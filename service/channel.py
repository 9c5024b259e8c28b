"""The stream the API processes and the engine process talk over: a Unix domain socket, driven by the
event loop (an :class:`asyncio.Protocol`: no thread, no future per message).

A message is an 8-byte prefix (the header's length and the tensor's length, little-endian uint32), the
header (msgpack, :mod:`service.wire`) and the tensor's raw bytes (none when its length is 0). Messages
that arrive whole are handed on as views of the bytes received; a message split across reads is joined
once. What is sent in one turn of the event loop (the answers of one batch, the requests that
arrived together) goes out in one write at the end of it (``writelines``: one ``writev``, header and
tensor not joined first): on this machine a system call costs more than the rest of a message.

Why not ZeroMQ: measured here (``scripts/bench_transport.py``, ``results/bench/transport-cpu.json``), a
DEALER/ROUTER ``ipc://`` round trip (40-byte header + 12 KiB tensor) cost 67-108 us of CPU (both
processes, ZeroMQ's I/O threads included) and 79-112 us of wall time; the same round trip on a Unix
socket 16-17 us and 16-29 us. Under the server it cost the API process about 0.2 ms per request more
than one process does, and its engine loop about 0.13 ms.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable

log = logging.getLogger("mtserve.channel")
PREFIX = struct.Struct("<II")
MAX_MESSAGE = 1 << 31  # a corrupt prefix closes the connection instead of buffering gigabytes

OnMessage = Callable[["Channel", memoryview, memoryview | None], None]


class Channel(asyncio.Protocol):
    """One connection; ``on_message(channel, header, tensor)`` per message, ``on_lost(channel)`` once."""

    def __init__(self, on_message: OnMessage, on_lost: Callable[[Channel], None] | None = None):
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._out: list = []  # parts to write at the end of this turn of the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.on_lost is not None:
            self.on_lost(self)

    def send(self, header: bytes, tensor=None) -> None:
        """Queue one message for this turn's write. ``tensor``: a buffer, or a list of buffers that
        travel as one frame, back to back (the rows of several requests, none copied)."""
        if self.closed or self.transport is None:
            return
        if not self._out:
            self._loop.call_soon(self.flush)  # type: ignore[union-attr]
        if tensor is None:
            self._out += (PREFIX.pack(len(header), 0), header)
        elif isinstance(tensor, list):
            parts = [memoryview(t).cast("B") for t in tensor]
            self._out += (PREFIX.pack(len(header), sum(p.nbytes for p in parts)), header, *parts)
        else:
            tensor = memoryview(tensor).cast("B")
            self._out += (PREFIX.pack(len(header), tensor.nbytes), header, tensor)

    def flush(self) -> None:
        out, self._out = self._out, []
        if out and not self.closed and self.transport is not None:
            self.transport.writelines(out)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._chunks:  # the rest of a message split across reads
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return
            data = b"".join(self._chunks)
            self._chunks, self._have = [], 0
        end = self._parse(data)
        if end < len(data):
            rest = data[end:]
            self._chunks, self._have = [rest], len(rest)
            self._need = PREFIX.size
            if len(rest) >= PREFIX.size:
                h, t = PREFIX.unpack_from(rest)
                self._need += h + t

    def _parse(self, data: bytes) -> int:
        """Hand on every whole message in ``data``; return where the first incomplete one starts."""
        view = memoryview(data)
        offset, size = 0, len(data)
        while size - offset >= PREFIX.size:
            h, t = PREFIX.unpack_from(data, offset)
            if h + t > MAX_MESSAGE:
                log.error("message of %d bytes announced: closing the connection", h + t)
                self.close()
                return size
            start = offset + PREFIX.size
            end = start + h + t
            if end > size:
                break
            tensor = view[start + h : end] if t else None
            try:
                self.on_message(self, view[start : start + h], tensor)
            except Exception:  # one bad message never stops the connection
                log.exception("message handler failed")
            offset = end
        return offset
