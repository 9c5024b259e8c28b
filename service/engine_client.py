"""The API process's side of the wire (:mod:`service.wire`): one connection to the engine process.

Every request gets an id and a future; the connection's protocol (service/channel.py) resolves them
as answers come back. The requests of one turn of the loop go in one :class:`~service.wire.Infer`
(their rows written from their own arrays, not copied), sent at the end of that turn. With an arena
(service/row_arena.py) the rows are copied into shared memory instead and the message says where;
their block is freed once the request is answered or given up.
A request whose client leaves, or whose waiter is cancelled (the outer layer's 504), sends a
:class:`~service.wire.Cancel`: the engine abandons the job if it has not started computing.
The engine's pid is watched (``pidfd_open`` on the event loop): if the engine process dies, every
pending request fails at once with :class:`NotReady` (503) and so does every later one.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
from collections.abc import Callable

import numpy as np

from contract.errors import ClientClosed, NotReady
from service import wire
from service.channel import Channel
from service.client_watch import Leaving
from service.row_arena import RowArena

log = logging.getLogger("mtserve.engine_client")
ENGINE_DIED = "the engine process exited; the server is restarting"


class EngineClient:
    """``infer`` and ``call`` over the wire; ``on_death(reason)`` is called once if the engine dies."""

    def __init__(
        self,
        endpoint: str,
        engine_pid: int,
        on_death: Callable[[str], None] | None = None,
        arena: RowArena | None = None,
        index: int = 0,
        on_spill: Callable[[], None] | None = None,
    ):
        self.endpoint = endpoint
        self.arena = arena
        self.on_spill = on_spill  # rows that did not fit the arena (they go on the socket)
        self.index = index
        self.engine_pid = engine_pid
        self.on_death = on_death
        self.pending: dict[int, asyncio.Future] = {}
        self.dead: str | None = None
        self._ids = itertools.count(1)
        self._chan: Channel | None = None
        self._unsent: dict[int, tuple[str, int, float, np.ndarray, int | None]] = {}  # this turn's, by id
        self._pidfd: int | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, self._chan = await loop.create_unix_connection(
                lambda: Channel(self._on_message, self._lost), self.endpoint
            )
        except OSError:  # no engine listening: it is gone
            self._died()
            return
        if self.arena is not None:
            self._send(wire.Hello(self.index))
        try:
            self._pidfd = os.pidfd_open(self.engine_pid)
        except ProcessLookupError:
            self._died()
            return
        loop.add_reader(self._pidfd, self._died)

    async def stop(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._chan is not None:
            self._chan.on_lost = None
            self._chan.close()

    def _died(self) -> None:
        """The engine's pidfd is readable: it exited. Fail everything pending, now and later."""
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
        if self.dead is not None:
            return
        self.dead = ENGINE_DIED
        log.error(
            "engine process %d exited: %d pending request(s) answered 503", self.engine_pid, len(self.pending)
        )
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(NotReady(ENGINE_DIED))
        self.pending.clear()
        if self.on_death is not None:
            self.on_death(ENGINE_DIED)

    def _send(self, msg, tensor=None) -> None:
        assert self._chan is not None
        self._chan.send(wire.encode(msg), tensor)

    def _open(self) -> tuple[int, asyncio.Future]:
        if self.dead is not None:
            raise NotReady(self.dead)
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        return rid, fut

    async def infer(
        self, task: str, x: np.ndarray, gen: int, deadline: float, leaving: Leaving | None = None
    ) -> tuple[str, np.ndarray]:
        """(version, probabilities [n, C]) of the rows ``x``; 504 / 429 / 503 as the engine answers;
        499 (ClientClosed) if ``leaving`` says the client left first (the engine is told to drop the job)."""
        rid, fut = self._open()
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self._send_requests)
        offset = None
        if self.arena is not None:
            offset = self.arena.put(wire.tensor_frame(x))
            if offset is None and self.on_spill is not None:
                self.on_spill()
        self._unsent[rid] = (task, gen, deadline, x, offset)
        stop = None
        try:
            stop = leaving(functools.partial(self._client_left, rid)) if leaving is not None else None
            return await fut
        finally:
            if stop is not None:
                stop()
            unanswered = self.pending.pop(rid, None) is not None and self.dead is None
            if unanswered and self._unsent.pop(rid, None) is None:  # drop it (if sent already)
                self._send(wire.Cancel(rid))
            if offset is not None:  # answered or given up: the engine reads it no more for this request
                self.arena.free(offset)  # type: ignore[union-attr]

    def _send_requests(self) -> None:
        """This turn's requests: one :class:`~service.wire.Infer` per row shape (one, but for a reload
        that changes the input size) and per way (in the arena, or each request's rows a part of the
        message's frame)."""
        unsent, self._unsent = self._unsent, {}
        if not unsent or self.dead is not None:
            return
        groups: dict[tuple[tuple[int, ...], bool], list[int]] = {}
        for rid, (_, _, _, x, offset) in unsent.items():
            groups.setdefault((x.shape[1:], offset is not None), []).append(rid)
        for (shape, in_arena), ids in groups.items():
            reqs = [unsent[rid] for rid in ids]
            msg = wire.Infer(
                ids, [r[0] for r in reqs], [r[1] for r in reqs], [r[2] for r in reqs],
                [len(r[3]) for r in reqs], shape, [r[4] for r in reqs] if in_arena else None,
            )  # fmt: skip
            self._send(msg, None if in_arena else [wire.tensor_frame(r[3]) for r in reqs])
        self._chan.flush()  # type: ignore[union-attr]  # written now, not one more turn later

    def _client_left(self, rid: int) -> None:
        fut = self.pending.get(rid)
        if fut is not None and not fut.done():
            fut.set_exception(ClientClosed("client disconnected"))

    async def call(self, method: str, arg: str | None = None, *, allow_remove: bool = False) -> dict:
        """An admin call (``reload``) run by the engine; its errors are raised here."""
        rid, fut = self._open()
        self._send(wire.Call(rid, method, arg, allow_remove))
        try:
            return await asyncio.shield(fut)  # a client that hangs up does not abandon a reload
        finally:
            if fut.done():
                self.pending.pop(rid, None)

    def _resolve(self, msg: wire.Failure | wire.Reply) -> None:
        fut = self.pending.pop(msg.id, None)
        if fut is None or fut.done():  # cancelled meanwhile
            return
        if isinstance(msg, wire.Failure):
            fut.set_exception(wire.error_of(msg))
        else:
            fut.set_result(msg.data)

    def _resolve_results(self, msg: wire.Results, tensor: memoryview | None) -> None:
        try:
            outs = wire.results_of(msg, tensor)
        except Exception as exc:  # the engine's bug: its requests fail (500), none hangs
            log.error("engine answers that do not add up: %s", exc)
            outs = [RuntimeError(f"engine: {exc}")] * len(msg.ids)
        for rid, out in zip(msg.ids, outs, strict=True):
            fut = self.pending.pop(rid, None)
            if fut is None or fut.done():  # cancelled meanwhile
                continue
            if isinstance(out, Exception):
                fut.set_exception(out)
            else:
                fut.set_result((msg.version, out))

    def _on_message(self, chan: Channel, header: memoryview, tensor: memoryview | None) -> None:
        msg = wire.decode_to_api(header)
        if isinstance(msg, wire.Results):
            self._resolve_results(msg, tensor)
        else:
            self._resolve(msg)

    def _lost(self, chan: Channel) -> None:
        """The engine closed the connection: it is exiting (or gone), as its pidfd will say."""
        self._died()
