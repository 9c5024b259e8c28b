"""The device's one thread: runs the engine's work in order, handed over through a ``SimpleQueue``.

``ThreadPoolExecutor.submit`` costs the event loop a ``Future`` (with its ``Condition``), a work item
and a semaphore probe (``_adjust_thread_count``) per batch: about 7 % of the loop's time on the demo
(py-spy, docs/bench.md). The batcher's hot path needs none of it: :meth:`EngineThread.call` puts
``(fn, arg, done)`` on a C queue and the thread calls ``done(result, error)`` itself. ``submit`` stays
(an :class:`~concurrent.futures.Executor`), for ``loop.run_in_executor`` (start-up, stop).
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from queue import SimpleQueue
from typing import Any

Done = Callable[[Any, BaseException | None], None]
_STOP = None
log = logging.getLogger("mtserve.engine")


class EngineThread(Executor):
    """One worker thread, work run in submission order; ``shutdown`` finishes what was handed over."""

    def __init__(self, name: str = "mtserve-engine"):
        self._queue: SimpleQueue = SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()
        _live.add(self)

    def call(self, fn: Callable[[Any], Any], arg: Any, done: Done) -> None:
        """Run ``fn(arg)`` on the thread, then ``done(result, None)`` or ``done(None, exc)`` there."""
        if self._closed:
            raise RuntimeError("the engine thread is shut down")
        self._queue.put((fn, arg, done))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()

        def run(_: Any) -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)

        with self._lock:
            self.call(run, None, _ignore)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more work; the thread ends after what was handed over (``wait``: join it)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _work(self) -> None:
        get = self._queue.get
        while (item := get()) is not _STOP:
            fn, arg, done = item
            result, error = None, None
            try:
                result = fn(arg)
            except BaseException as exc:
                error = exc
            try:
                done(result, error)
            except Exception:  # e.g. the loop closed meanwhile: the thread serves on
                log.exception("engine thread: the completion callback failed")
            del item, fn, arg, done, result, error  # no reference kept to a finished batch while idle


def favour_engine_thread(switch_ms: float) -> None:
    """Set the GIL switch interval of a process that holds an engine thread (``--gil-switch-ms``).

    Each onnxruntime call releases the GIL; between calls (several per batch: one per segment variant)
    and for the softmax the device's thread needs it back, and a busy event loop keeps it up to the
    interval: Python's 5 ms left the engine idle while requests waited. 0.5 ms measured better in
    interleaved runs here (P1 at saturation, medians: one process 0.50 -> 0.54, ``--workers 1`` 0.59 ->
    0.67), shorter no better (docs/bench.md, "Fourth session")."""
    sys.setswitchinterval(switch_ms / 1000.0)


_live: weakref.WeakSet[EngineThread] = weakref.WeakSet()


def _finish_all() -> None:
    """As ThreadPoolExecutor's workers: the interpreter finishes the work handed over before it exits
    (a daemon thread killed inside onnxruntime at finalisation could crash the exit)."""
    for thread in list(_live):
        thread.shutdown(wait=True)


threading._register_atexit(_finish_all)  # type: ignore[attr-defined]  # what concurrent.futures uses


def _ignore(result: Any, error: BaseException | None) -> None:
    pass
