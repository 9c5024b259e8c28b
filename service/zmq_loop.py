"""A ZeroMQ socket driven by the asyncio event loop, without a future per message.

``zmq.asyncio`` creates futures and callbacks for every send and receive; on the request path of the
API and engine processes that costs more than the message itself. Here the socket's own file
descriptor is watched with ``loop.add_reader``; since that descriptor is edge-triggered (it signals a
change of ``ZMQ_EVENTS``, and a send may consume the signal), every wake-up and every send drains
the socket until ``EVENTS`` shows nothing left, handing each message to ``on_message``.
Sends never wait: the high-water marks are off (the queue and the admission bound what is in flight).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import zmq

log = logging.getLogger("mtserve.zmq")
BURST = 256  # messages handled per turn of the event loop before yielding to other callbacks


class LoopSocket:
    def __init__(self, sock: zmq.Socket, on_message: Callable[[list], None]):
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        self.sock = sock
        self.on_message = on_message
        self.loop = asyncio.get_running_loop()
        self.fd = sock.getsockopt(zmq.FD)
        self._scheduled = False
        self.loop.add_reader(self.fd, self._drain)
        self._schedule()  # messages that arrived before the reader was added

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        sock = self.sock
        for _ in range(BURST):
            if sock.closed or not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self.on_message(frames)
            except Exception:  # one bad message never stops the socket
                log.exception("message handler failed")
        self._schedule()  # more waiting: the next turn of the loop

    def send(self, frames: Sequence) -> None:
        self.sock.send_multipart(frames, copy=False)
        self._schedule()  # a send may have consumed the descriptor's signal of a message received

    def close(self, linger_ms: int = 0) -> None:
        if not self.sock.closed:
            self.loop.remove_reader(self.fd)
            self.sock.close(linger=linger_ms)
