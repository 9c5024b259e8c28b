"""The running event loop without a system call, for the per-request paths.

On Python 3.11 ``asyncio.get_running_loop()`` (and ``asyncio.current_task()`` without a loop, which
calls it) compares the loop's pid with ``getpid()`` on every call, to notice a fork: a system call.
Three such calls per request (the deadline's task, the request's future, the client watch) were 11 %
of the samples of a server's event-loop thread under load (py-spy ``--native``, `/v2`, one process):
on this project's virtual machines a system call under load costs microseconds, not the 0.2 us of a
tight loop. Python 3.12 dropped the check.

:func:`running_loop` remembers, per thread, the loop it found running there; while that loop still
runs it is the one this thread runs (a thread runs one loop at a time, and this loop was found
running on it). Otherwise it asks asyncio again. Not for code that forks a running loop (the
servers spawn their processes).
"""

from __future__ import annotations

import asyncio
import threading

_by_thread: dict[int, asyncio.AbstractEventLoop] = {}


def running_loop() -> asyncio.AbstractEventLoop:
    """The event loop running in this thread, as ``asyncio.get_running_loop()`` (RuntimeError if none)."""
    thread = threading.get_ident()
    loop = _by_thread.get(thread)
    if loop is None or not loop.is_running() or getattr(loop, "_thread_id", thread) != thread:
        loop = _by_thread[thread] = asyncio.get_running_loop()
    return loop
