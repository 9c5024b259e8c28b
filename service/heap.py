"""The engine process's C heap (glibc malloc): what loading sessions leaves behind, given back.

Two things made a reload grow the process by more than the files it loads (results/add-task):

- *Freed memory stays resident.* Loading an onnxruntime session allocates far more than it keeps (the
  model's protobuf, copies of initializers, graph rewrites); glibc returns freed blocks to the OS
  only from the top of a heap, so what lies below blocks still in use stays: the demo engine held
  82 MiB of heap of which 45 MiB were free after its first warm-up. ``malloc_trim(0)`` hands every
  free page of every arena back (``madvise``; nothing in use moves). :class:`HeapTrimmer` runs it
  after an engine has started and after one has stopped, in a thread of its own, never on the
  caller's (the event loop, when a retired version closes): ctypes releases the GIL during the
  call, and a thread that mallocs meanwhile waits only if it uses the arena being trimmed.
- *Every new thread gets a malloc arena of its own* (up to 8 per CPU), and ``malloc_trim`` cannot
  shrink the top of a thread's arena. A reload runs in new threads (the bundle verified in a worker
  thread, the new version's executor thread), so the first reload of a server grew it by 2.1-2.3 MiB
  of new arenas whatever it loaded. :func:`limit_arenas` caps the process at 2 arenas (the main
  thread's and one that every other thread shares, ``mallopt(M_ARENA_MAX)``): new threads reuse the
  free space of the old ones. A reload now starts one thread only, the new version's executor: the
  bundle is verified in this module's thread (:meth:`HeapTrimmer.submit`), which exists anyway.

glibc only (elsewhere both are no-ops). ``MTSERVE_TRIM_HEAP=0`` turns the trim off and
``MTSERVE_MALLOC_ARENAS=0`` leaves the arenas to glibc (``=N``: at most N); a ``MALLOC_ARENA_MAX``
or ``GLIBC_TUNABLES`` arena setting in the environment wins.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from service.ort_setup import rss_bytes

log = logging.getLogger("mtserve.heap")
M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)
DEFAULT_ARENAS = 2


def _libc_function(name: str, argtypes: list, restype=ctypes.c_int):
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def _env_off(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() in ("0", "false", "off", "no")


_arenas_lock = threading.Lock()
_arenas_set: int | None = None


def limit_arenas() -> int | None:
    """Cap glibc's malloc arenas for the rest of the process (once; arenas made before stay). Returns
    the limit in force, None when left to glibc."""
    global _arenas_set
    with _arenas_lock:
        if _arenas_set is not None:
            return _arenas_set or None
        _arenas_set = 0
        value = os.environ.get("MTSERVE_MALLOC_ARENAS", str(DEFAULT_ARENAS)).strip()
        limit = int(value) if value.isdigit() else DEFAULT_ARENAS
        external = "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", "")
        mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])
        if limit > 0 and not external and mallopt is not None and mallopt(M_ARENA_MAX, limit) == 1:
            _arenas_set = limit
            log.debug("malloc arenas: at most %d", limit)
        return _arenas_set or None


class HeapTrimmer:
    """``request()`` from any thread: one ``malloc_trim(0)`` soon, in the ``mtserve-heap-trim`` thread.

    That thread is also the process's one thread for other work off the serving path (``submit``: a
    reload's bundle verification), so that a reload starts no thread of its own: every thread that
    ends leaves its stack in glibc's cache, partly resident (16-24 KiB), and one that stays idle
    (the event loop's default executor) keeps its stack and its malloc cache (results/add-task)."""

    def __init__(self, trim=None) -> None:
        self._trim = trim if trim is not None else _libc_function("malloc_trim", [ctypes.c_size_t])
        self._lock = threading.Lock()
        self._waiting: Future | None = None  # a trim requested and not started yet
        self._executor: ThreadPoolExecutor | None = None
        self.trims = 0
        self.released_bytes = 0  # RSS given back, all trims together
        self.last: dict | None = None

    def _thread(self) -> ThreadPoolExecutor:
        if self._executor is None:  # under self._lock
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="mtserve-heap-trim")
        return self._executor

    def submit(self, fn, /, *args) -> Future:
        """Run ``fn(*args)`` in the trimmer's thread (after what is queued there), trimming or not."""
        with self._lock:
            return self._thread().submit(fn, *args)

    def request(self, why: str) -> Future | None:
        """Ask for a trim (after ``why``); None when trimming is off or unsupported. A request while
        one waits joins it; one while a trim runs queues the next (it may find more to free)."""
        if self._trim is None or _env_off("MTSERVE_TRIM_HEAP", "1"):
            return None
        with self._lock:
            if self._waiting is not None:
                return self._waiting
            self._waiting = fut = self._thread().submit(self._run, why)
            return fut

    def _run(self, why: str) -> dict:
        with self._lock:
            self._waiting = None
        rss0, t0 = rss_bytes(), time.perf_counter()
        self._trim(0)
        rss1, t1 = rss_bytes(), time.perf_counter()
        released = (rss0 - rss1) if rss0 is not None and rss1 is not None else 0
        self.trims += 1
        self.released_bytes += max(0, released)
        self.last = {
            "after": why,
            "thread": threading.current_thread().name,
            "released_bytes": released,
            "rss_bytes": rss1,
            "s": round(t1 - t0, 4),
        }
        log.info("heap trim after %s: %.1f MiB given back, RSS %s MiB", why, released / 2**20,
                 None if rss1 is None else round(rss1 / 2**20, 1))  # fmt: skip
        return self.last

    def stats(self) -> dict:
        return {"trims": self.trims, "released_bytes": self.released_bytes, "last": self.last}


_default = HeapTrimmer()


def default_trimmer() -> HeapTrimmer:
    """The process's trimmer (one thread for every engine: the first one and each reload)."""
    return _default
