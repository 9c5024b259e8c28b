"""uvicorn's httptools protocol, writing each response in one system call.

uvicorn writes a response's status line and headers when the app sends ``http.response.start`` and its
body when it sends ``http.response.body``: two ``transport.write`` calls, and uvloop sends each at once.
That was two ``write`` system calls and two TCP segments per answer (strace of an API process under
``/v2`` load: 12,134 writes for 6,261 requests), and the client reads twice. :class:`OneWriteProtocol`
hands uvicorn a :class:`TurnTransport` instead, which keeps what is written during one turn of the
event loop and sends it in one write as soon as that turn is over (a callback queued for the loop's
next pass, which does not wait); ``close`` sends what it holds first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

FLUSH_AT = 1 << 16  # bytes held at most: a large body goes out at once


class TurnTransport:
    """A transport's writes of one turn of the loop, sent together; everything else goes straight to it."""

    __slots__ = ("_held", "_loop", "_size", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self.transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None
        self._size = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._held is None:
            self._held, self._size = [data], len(data)
            self._loop.call_soon(self.flush)
        else:
            self._held.append(data)
            self._size += len(data)
        if self._size >= FLUSH_AT:
            self.flush()

    def writelines(self, lines) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held:
            self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class OneWriteProtocol(HttpToolsProtocol):
    """``uvicorn.Config(http=OneWriteProtocol)``: httptools, each response written once."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(TurnTransport(transport, self.loop))  # type: ignore[arg-type]
