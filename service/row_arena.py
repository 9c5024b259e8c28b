"""Rows handed to the engine through shared memory instead of the socket (``--workers N``).

An API process writes each request's preprocessed rows into its own **arena**, a block of shared
memory (a ``memfd`` the supervisor creates, one per API process, mapped by that process and, read-only,
by the engine process), and sends only where they are (a byte offset in :class:`~service.wire.Infer`).
The engine reads them as a view: no copy into a socket, none out of it, no message reassembled.
Measured with 224 px rows (602 KB each, device emulated, docs/bench.md "Seventh session"): the engine
process's loop, the one thread every request passes through, spent about 0.2 ms per request receiving
them over the socket.

The arena is a ring with one writer (the API process's event loop), as vLLM's shared-memory ring
buffer: :meth:`RowArena.put` takes the next free bytes after the newest block, :meth:`RowArena.free`
releases a block when its request is answered (or given up), and the space is reclaimed from the
oldest block on, once it and every block before it are free. Where a request's rows do not fit (a full
arena, a request larger than it), ``put`` says so and they travel on the socket as before.

A ring that always went round the whole arena would, under steady load, write every page of it
(``--rows-shm-mb`` resident per API process, whatever the rows in flight need). It goes round a
smaller *span* instead (``MIN_SPAN`` to start with), doubled (up to the whole arena) at most once a
lap when a request did not fit: the pages written are about what the peak of rows in flight needs.

Why a memfd (``os.memfd_create``) and not ``/dev/shm``: its pages are not counted against the size of
``/dev/shm``, which containers make small (Docker: 64 MiB) and where a write past it is a SIGBUS. The
engine may read a block its request has given up (the client left, the deadline passed) while the API
process already reuses it: it reads rows that are no longer that request's, whose answer nobody
waits for. It never writes: its mapping is read-only.
"""

from __future__ import annotations

import math
import mmap
import os
from collections import deque

import numpy as np

ALIGN = 64  # every block starts on a cache line (and a float32)
MIB = 1 << 20
MIN_SPAN = 2 * MIB  # the ring's first span (the demo's rows: 12 KB; 224 px: 602 KB)


def create(size: int) -> int:
    """A new anonymous shared-memory file of ``size`` bytes (its fd; pages are allocated when written).
    OSError where the system has no ``memfd_create``."""
    if not hasattr(os, "memfd_create"):
        raise OSError("os.memfd_create is not available on this system")
    fd = os.memfd_create("mtserve-rows", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def map_fd(fd: int, writable: bool) -> mmap.mmap:
    """The whole file ``fd`` mapped shared (``writable`` for the API process, read-only for the engine)."""
    size = os.fstat(fd).st_size
    access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, access=access)


class RowArena:
    """The writer's side: a ring of blocks in ``buffer``; ``put`` copies an array in, ``free`` releases it."""

    def __init__(self, buffer: mmap.mmap | bytearray, min_span: int = MIN_SPAN):
        self.bytes = np.frombuffer(buffer, dtype=np.uint8)
        self.size = len(self.bytes)
        self.span = min(self.size, min_span)  # where the ring wraps: doubled when a request does not fit
        self._grow = False  # a request did not fit: the span doubles when the head next reaches it
        self._head = 0  # where the next block goes when the ring is empty or has not wrapped
        self._blocks: deque[list] = deque()  # [start, end, freed], oldest first
        self._by_start: dict[int, list] = {}

    @property
    def blocks(self) -> int:
        """Blocks not yet reclaimed (freed ones behind an older live block included)."""
        return len(self._blocks)

    def _place(self, n: int) -> int | None:
        """Where ``n`` bytes go: after the newest block, else at the start (past the free end), else None."""
        if not self._blocks:
            if n > self.span and self._grow:
                self.span, self._grow = min(self.size, 2 * self.span), False
            return 0 if n <= self.span else None
        oldest, newest = self._blocks[0][0], self._blocks[-1][0]
        head = self._head
        if newest >= oldest:  # not wrapped: free are [head, span) and [0, oldest)
            if self.span - head < n and self._grow:
                self.span, self._grow = min(self.size, 2 * self.span), False
            if self.span - head >= n:
                return head
            return 0 if oldest >= n else None
        return head if oldest - head >= n else None  # wrapped: free is [head, oldest)

    def put(self, x) -> int | None:
        """Copy ``x`` (a C-contiguous buffer: an array, ``wire.tensor_frame``'s view) into a free block:
        its byte offset, or None where it does not fit (then the span doubles, at once if the head can
        use it, else when it next reaches the span)."""
        data = np.frombuffer(x, dtype=np.uint8)
        n = -(-data.nbytes // ALIGN) * ALIGN
        if n == 0:
            return None
        if (start := self._place(n)) is None:
            self._grow = self.span < self.size
            if (start := self._place(n)) is None:
                return None
        self.bytes[start : start + data.nbytes] = data
        block = [start, start + n, False]
        self._blocks.append(block)
        self._by_start[start] = block
        self._head = start + n
        return start

    def free(self, offset: int) -> None:
        """The block at ``offset`` is no longer read: reclaim it (and those after it already freed) once
        every older block is free too."""
        block = self._by_start.pop(offset)
        block[2] = True
        blocks = self._blocks
        while blocks and blocks[0][2]:
            blocks.popleft()
        if not blocks:
            self._head = 0


def rows_at(arena: np.ndarray, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """The engine's side: a float32 view of ``shape`` at byte ``offset`` of ``arena`` (a float32 view of
    the mapping); ValueError if it does not lie inside it or is not aligned."""
    count = math.prod(shape)
    if offset < 0 or offset % 4 or offset // 4 + count > arena.size:
        raise ValueError(f"rows at byte {offset} ({count} values) outside an arena of {arena.nbytes} bytes")
    return arena[offset // 4 : offset // 4 + count].reshape(shape)
