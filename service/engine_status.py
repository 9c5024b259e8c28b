"""What the engine process publishes to the API processes without a message: a small shared-memory
block (a file on ``/dev/shm``, mapped by every process of the server).

int64 slots: the rows queued in the engine and its queue size (the room the API processes' admission
reads before a request's body is read), ready, draining, failed, the model generation served, the
engine's pid; per API process, its pid and the oldest generation it still has requests admitted to
(the engine retires a version once every API process is past it). After them, a msgpack blob of
what changes rarely (bundle path, version, providers, status), written under a sequence lock.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path

import msgspec

MAX_API = 64
QUEUED, QUEUE_SIZE, READY, DRAINING, FAILED, GEN, ENGINE_PID, SEQ, BLOB_LEN, N_API = range(10)
API_GEN = 16
API_PID = API_GEN + MAX_API
HEADER = 8 * (API_PID + MAX_API)
BLOB_MAX = 64 * 1024 - HEADER
SIZE = HEADER + BLOB_MAX


class StatusBlock:
    """The mapped block; ``ints`` is an int64 view of its header (plain reads and writes)."""

    def __init__(self, path: Path, create: bool = False, n_api: int = 0):
        self.path = Path(path)
        if create:
            if n_api > MAX_API:
                raise ValueError(f"at most {MAX_API} API processes, not {n_api}")
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, SIZE)
        else:
            fd = os.open(self.path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self.ints = memoryview(self._map)[:HEADER].cast("q")
        if create:
            self.ints[N_API] = n_api
        self._decoder = msgspec.msgpack.Decoder(dict)
        self._seen_seq = -1
        self._info: dict = {}

    # -- the room, read per request ----------------------------------------------------------------
    def room(self) -> tuple[int, int]:
        """(rows queued in the engine, its queue size): :class:`service.admission.Admission`'s room."""
        ints = self.ints
        return ints[QUEUED], ints[QUEUE_SIZE]

    # -- the blob ------------------------------------------------------------------------------
    def publish(self, info: dict) -> None:
        """Engine side: replace the blob (readers retry while it is being written)."""
        data = msgspec.msgpack.encode(info)
        if len(data) > BLOB_MAX:
            raise ValueError(f"engine status of {len(data)} bytes over {BLOB_MAX}")
        ints = self.ints
        ints[SEQ] += 1  # odd: being written
        self._map[HEADER : HEADER + len(data)] = data
        ints[BLOB_LEN] = len(data)
        ints[SEQ] += 1

    def info(self) -> dict:
        """API side: the last blob published ({} before the first); decoded once per change."""
        for _ in range(1000):
            seq = self.ints[SEQ]
            if seq == self._seen_seq:
                return self._info
            if seq % 2:
                continue
            data = bytes(self._map[HEADER : HEADER + self.ints[BLOB_LEN]])
            if self.ints[SEQ] != seq:
                continue
            self._info = self._decoder.decode(data) if data else {}
            self._seen_seq = seq
            return self._info
        return self._info

    # -- the API processes ---------------------------------------------------------------------
    def api_count(self) -> int:
        return self.ints[N_API]

    def api_pids(self) -> list[int]:
        return [self.ints[API_PID + i] for i in range(self.ints[N_API])]

    def set_api_pid(self, index: int, pid: int) -> None:
        self.ints[API_PID + index] = pid

    def api_gen(self, index: int) -> int:
        return self.ints[API_GEN + index]

    def set_api_gen(self, index: int, gen: int) -> None:
        self.ints[API_GEN + index] = gen

    def close(self) -> None:
        self.ints.release()
        self._map.close()


SUPERVISOR_PID_ENV = "MTSERVE_SUPERVISOR_PID"


def watch_supervisor(loop, on_death) -> Callable[[], None]:
    """Call ``on_death`` once (on ``loop``) when the supervisor exits: a pidfd on its pid, read from
    the environment the supervisor gave its children. A supervisor that died before this runs (the
    child was re-parented already, or its pid is gone) counts at once. Returns ``stop()``, which ends
    the watch."""
    expected = int(os.environ.get(SUPERVISOR_PID_ENV) or os.getppid())
    fired = False

    def stop() -> None:
        nonlocal fd
        if fd is not None:
            loop.remove_reader(fd)
            os.close(fd)
            fd = None

    def once() -> None:
        nonlocal fired
        stop()
        if not fired:
            fired = True
            on_death()

    try:
        fd: int | None = os.pidfd_open(expected)
    except ProcessLookupError:
        fd = None
        loop.call_soon(once)
        return stop
    loop.add_reader(fd, once)
    if os.getppid() != expected:  # re-parented: the pid may be a new process's already
        loop.call_soon(once)
    return stop
