"""One write per response: the transport that holds a turn's writes, and uvicorn's protocol with it."""

from __future__ import annotations

import asyncio

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.http_protocol import FLUSH_AT, OneWriteProtocol, TurnTransport


class Recorder(asyncio.Transport):
    """What a protocol wrote, call by call."""

    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


async def test_the_writes_of_one_turn_go_out_together_at_its_end():
    inner = Recorder()
    t = TurnTransport(inner, asyncio.get_running_loop())
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.write(b"")
    t.writelines([b"{", b"}"])
    assert inner.writes == []  # held for the rest of this turn
    await asyncio.sleep(0)
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
    t.write(b"next")
    await asyncio.sleep(0)
    assert inner.writes[1:] == [b"next"]
    assert t.get_extra_info("peername") == ("127.0.0.1", 5000)  # the rest: the transport's own


async def test_close_and_a_large_body_send_what_is_held_at_once():
    inner = Recorder()
    t = TurnTransport(inner, asyncio.get_running_loop())
    t.write(b"head")
    t.write(b"x" * FLUSH_AT)
    assert inner.writes == [b"head" + b"x" * FLUSH_AT]
    t.write(b"last")
    t.close()
    assert inner.writes[1:] == [b"last"] and inner.closed
    await asyncio.sleep(0)  # the turn's flush finds nothing left
    assert len(inner.writes) == 2


async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize(("protocol", "writes"), [(OneWriteProtocol, 1), (HttpToolsProtocol, 2)])
async def test_a_response_is_one_write(protocol, writes):
    """uvicorn's own protocol writes the head and the body apart; ours once."""
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    config.load()
    proto = protocol(config, ServerState(), {}, _loop=asyncio.get_running_loop())
    inner = Recorder()
    proto.connection_made(inner)
    proto.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(inner.writes) == writes
    answer = b"".join(inner.writes)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok")
    proto.connection_lost(None)
