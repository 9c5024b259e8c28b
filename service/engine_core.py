"""The engine process of ``--workers N``: one per device, the only owner of the batcher and the sessions.

It runs an asyncio loop that never touches HTTP: a Unix socket server (:mod:`service.channel`) receives
the rows of every API process (:mod:`service.wire`), the batcher forms fair cross-task batches of all
of them, and each answer goes back to the API process that asked. It reuses the single-process
:class:`Service` (the served version, its batcher, live reload) and publishes what the API processes
need without a message in the :class:`~service.engine_status.StatusBlock`: its room (rows queued,
queue size) at every change, ready / draining / failed, and the model generation served.

Live reload across processes: every loaded version gets a generation number. A request carries the
generation its API process admitted it to and runs on that version, as in one process. The engine
holds, for each API process, one lease on the version that process admits to; a process moves on when
it has seen the new generation and has no request left on the old one (its ``api_gen`` slot), and the
engine moves the lease with it, so the old version closes only once no API process can send it rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from functools import partial

import numpy as np

from contract.errors import InvalidInput, NotReady
from service import wire
from service.app import build_engine
from service.channel import Channel
from service.engine_status import (
    DRAINING,
    ENGINE_PID,
    FAILED,
    GEN,
    QUEUE_SIZE,
    QUEUED,
    READY,
    StatusBlock,
    watch_supervisor,
)
from service.gc_tuning import settle_after_start_up
from service.schedule import Job
from service.served_version import ServedVersion
from service.server_state import Service
from service.settings import Settings

log = logging.getLogger("mtserve.engine_core")
POLL_S = 0.01  # how often the engine looks at the API processes' generations and its own state


class EngineCore:
    """Built in the engine process (verifies the bundle: BundleError), then :meth:`run`."""

    def __init__(
        self, settings: Settings, block: StatusBlock, endpoint: str, arenas: list[np.ndarray] | None = None
    ):
        self.settings = settings
        self.arenas = arenas or []  # per API process, its rows' shared memory (float32, read-only)
        self.arena_of: dict[Channel, np.ndarray] = {}  # by connection, once its Hello named the process
        self.block = block
        self.endpoint = endpoint
        self.service = Service(settings, build_engine(settings), self._fatal, partial(build_engine, settings))
        self.n_api = block.api_count()
        self.gen = 0
        self.units: dict[int, ServedVersion] = {}  # generation -> version, while it may get rows
        self.held: list[int] = []  # per API process: the generation the engine holds its lease on
        self.waiting: dict[tuple[bytes, int], tuple[ServedVersion, Job]] = {}  # by (API process, id)
        self.answering: set[asyncio.Task] = set()  # admin calls
        self._outbox: dict[tuple[Channel, str], list] = {}  # this turn's answers, by API process and version
        self.stopping = asyncio.Event()
        self.fatal: str | None = None
        self.orphaned = False  # the supervisor died: the engine, its last child, removes the run directory
        self._published: tuple | None = None
        self._room_due = False
        self.server: asyncio.Server | None = None

    def _orphaned(self) -> None:
        self.orphaned = True
        self.stopping.set()

    def _fatal(self, message: str) -> None:
        self.fatal = message
        self._publish_state()
        self.stopping.set()

    # -- what the API processes read ------------------------------------------------------------
    def _room_changed(self) -> None:
        """A batcher's queue changed: publish the room at the end of this turn (once for all of the
        turn's requests; the API processes read it for their next admissions)."""
        if not self._room_due:
            self._room_due = True
            asyncio.get_running_loop().call_soon(self._publish_room)

    def _publish_room(self) -> None:
        self._room_due = False
        self.block.ints[QUEUED] = sum(max(0, u.batcher.queued_rows) for u in self.units.values())

    def _publish_state(self) -> None:
        s = self.service
        ints = self.block.ints
        ints[READY], ints[DRAINING], ints[FAILED] = int(s.ready), int(s.draining), int(self.fatal is not None)
        key = (self.gen, s.ready, s.draining, s.failed, self.fatal, s.reloads, s._reload is not None)
        if key == self._published:
            return
        describe = getattr(s.engine, "describe", None)
        info = {
            "gen": self.gen,
            "path": str(s.unit.path),
            "status": s.status(),
            "describe": describe() if describe is not None and s.ready else {},
            "failed": self.fatal or s.failed,
        }
        self.block.publish(info)
        ints[GEN] = self.gen  # after the blob: an API process that sees the generation finds its path
        self._published = key

    async def _register(self, unit: ServedVersion) -> None:
        """A version that starts serving: a new generation, its room published at every change."""
        self.gen += 1
        self.units[self.gen] = unit
        unit.batcher.on_queued = self._room_changed
        if not self.held:  # the first version: every API process starts on it
            for _ in range(self.n_api):
                await unit.__aenter__()
            self.held = [self.gen] * self.n_api
        log.info("generation %d: version %s from %s", self.gen, unit.version, unit.path)

    async def _move_leases(self) -> None:
        for i, gen in enumerate(self.held):
            now = self.block.api_gen(i)
            if now > gen and now in self.units:
                await self.units[now].__aenter__()
                await self.units[gen].__aexit__(None, None, None)
                self.held[i] = now

    async def _release_leases(self) -> None:
        for gen in self.held:
            await self.units[gen].__aexit__(None, None, None)
        self.held = []

    async def _poll(self) -> None:
        while True:
            if self.service.unit is not self.units.get(self.gen):  # a reload swapped versions
                await self._register(self.service.unit)
            await self._move_leases()
            for gen in [
                g for g, u in self.units.items() if g != self.gen and u.closing and g not in self.held
            ]:
                del self.units[gen]
            self._publish_state()
            self._publish_room()
            await asyncio.sleep(POLL_S)

    # -- messages --------------------------------------------------------------------------------
    @staticmethod
    def _send(chan: Channel, msg, tensor=None) -> None:
        chan.send(wire.encode(msg), tensor)

    def _infer(self, chan: Channel, msg: wire.Infer, tensor: memoryview | None) -> None:
        """Queue every request of the message (each failure answered on its own)."""
        try:
            xs = wire.requests_of(msg, tensor, self.arena_of.get(chan))
        except Exception as exc:
            for rid in msg.ids:
                self._send(chan, wire.failure_of(rid, exc))
            return
        for rid, task, gen, deadline, x in zip(msg.ids, msg.tasks, msg.gens, msg.deadlines, xs, strict=True):
            unit = self.units.get(gen)
            try:
                if unit is None:
                    raise NotReady(f"model generation {gen} is not served (now {self.gen})")
                unit.task(task)
                if list(msg.shape) != (size := list(unit.manifest.input.size)):
                    raise InvalidInput(f"rows of shape {list(msg.shape)} for input {size}")
                job = unit.batcher.submit(task, x, deadline)  # 429 when full, 503 when stopping
            except Exception as exc:
                self._send(chan, wire.failure_of(rid, exc))
                continue
            self.waiting[chan, rid] = (unit, job)
            job.future.add_done_callback(partial(self._answer, chan, rid, unit.version))

    def _answer(self, chan: Channel, rid: int, version: str, future: asyncio.Future) -> None:
        """The job's future is done: its rows join this turn's :class:`~service.wire.Results` to its API
        process (its error goes alone). No timer per request here: the API process answers 504 at the
        deadline and cancels; the batcher never computes a job past it."""
        self.waiting.pop((chan, rid), None)
        if future.cancelled():  # cancelled by its API process: nobody waits for it
            return
        if (exc := future.exception()) is not None:
            self._send(chan, wire.failure_of(rid, exc))
            return
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._send_results)
        self._outbox.setdefault((chan, version), []).append((rid, future.result()))

    def _send_results(self) -> None:
        """This turn's answers: one message per API process (and version), the rows back to back."""
        outbox, self._outbox = self._outbox, {}
        for (chan, version), answers in outbox.items():
            ids = [rid for rid, _ in answers]
            rows = [len(out) for _, out in answers]
            widths = [len(out[0]) for _, out in answers]
            flat = np.concatenate([row for _, out in answers for row in out]).astype(np.float32, copy=False)
            self._send(chan, wire.Results(version, ids, rows, widths), flat)
            chan.flush()  # written now, not one more turn of the loop later

    async def _call(self, chan: Channel, msg: wire.Call) -> None:
        try:
            if msg.method != "reload":
                raise InvalidInput(f"unknown engine call {msg.method!r}")
            data = await self.service.reload(msg.arg, allow_remove=msg.allow_remove)
            self._send(chan, wire.Reply(msg.id, data))
        except Exception as exc:
            self._send(chan, wire.failure_of(msg.id, exc))

    def _lost(self, chan: Channel) -> None:
        """An API process's connection closed (it exited): its queued jobs are never computed."""
        self.arena_of.pop(chan, None)
        for key in [k for k in self.waiting if k[0] is chan]:
            unit, job = self.waiting.pop(key)
            unit.batcher.cancel(job)

    def _on_message(self, chan: Channel, header: memoryview, tensor: memoryview | None) -> None:
        try:
            msg = wire.decode_to_engine(header)
        except Exception as exc:  # a malformed message is logged, never fatal
            log.warning("engine: undecodable message dropped (%s)", exc)
            return
        if isinstance(msg, wire.Infer):
            self._infer(chan, msg, tensor)
        elif isinstance(msg, wire.Hello):
            if 0 <= msg.index < len(self.arenas):
                self.arena_of[chan] = self.arenas[msg.index]
            else:
                log.warning("engine: no arena for API process %d (rows must come by socket)", msg.index)
        elif isinstance(msg, wire.Cancel):
            waiting = self.waiting.pop((chan, msg.id), None)
            if waiting is not None:  # not computed if it has not started
                unit, job = waiting
                unit.batcher.cancel(job)
        else:
            task = asyncio.get_running_loop().create_task(self._call(chan, msg))
            self.answering.add(task)
            task.add_done_callback(self.answering.discard)

    # -- life cycle --------------------------------------------------------------------------------
    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or the supervisor's death): drain, then return the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        unwatch = watch_supervisor(loop, self._orphaned)  # the supervisor died: stop too
        self.server = await loop.create_unix_server(
            lambda: Channel(self._on_message, self._lost), self.endpoint
        )
        ints = self.block.ints
        ints[QUEUE_SIZE], ints[ENGINE_PID] = self.settings.queue_size, os.getpid()
        await self._register(self.service.unit)
        self._publish_state()  # the supervisor starts the API processes once this is published
        await self.service.start()  # sessions + warm-up in the background; READY once done
        settle_after_start_up()
        tasks = [loop.create_task(self._poll())]
        await self.stopping.wait()
        log.info("engine: stopping (finishing every admitted request)")
        self.service.draining = True
        self._publish_state()
        await self._release_leases()
        await self.service.stop()  # finishes every queued job (answered by their callbacks)
        if self.answering:
            await asyncio.wait(set(self.answering))
        await asyncio.sleep(0.05)  # the last answers' callbacks, then their writes (service/channel.py)
        for t in tasks:
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)
        unwatch()
        self.server.close()  # answers already written stay in the sockets' buffers for the readers
        return 1 if self.fatal else 0
