"""The engine process's C heap (service/heap.py): freed heap given back after engines start and stop,
in a thread of its own; at most 2 malloc arenas, so the new threads of a reload reuse the old ones'."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from service import heap
from service.heap import HeapTrimmer

ROOT = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(heap._libc_function("malloc_trim", [ctypes.c_size_t]) is None, reason="not glibc")


class BlockingTrim:
    """A stand-in for malloc_trim: records the thread it runs in, blocks until released."""

    def __init__(self) -> None:
        self.threads: list[str] = []
        self.release = threading.Event()

    def __call__(self, pad: int) -> int:
        self.threads.append(threading.current_thread().name)
        assert self.release.wait(10), "never released"
        return 1


def _wait_running(trim: BlockingTrim) -> None:
    for _ in range(1000):
        if trim.threads:
            return
        threading.Event().wait(0.01)
    raise AssertionError("the trim never started")


def test_engine_trims_after_start_and_stop_in_its_own_thread(tiny_bundle, monkeypatch):
    """start() and stop() (on the event loop, when a retired version closes) return while the trim
    still runs: it runs in the trimmer's thread, never in the caller's."""
    pytest.importorskip("onnxruntime")
    from contract.bundle import load_bundle
    from service import engine as engine_module

    trim = BlockingTrim()
    trimmer = HeapTrimmer(trim)
    monkeypatch.setattr(engine_module, "default_trimmer", lambda: trimmer)
    monkeypatch.delenv("MTSERVE_TRIM_HEAP", raising=False)
    engine = engine_module.OrtEngine(load_bundle(tiny_bundle), threads=1)
    engine.start()  # returns although the trim it asked for is blocked
    assert engine.describe()["ready"]
    _wait_running(trim)
    engine.stop()  # returns too: its trim waits for the first one
    trim.release.set()
    trimmer.request("flush").result(timeout=10)  # joins the waiting one
    assert trimmer.last["after"].endswith("stopped")
    assert len(trim.threads) == 2
    assert all(t.startswith("mtserve-heap-trim") for t in trim.threads)
    assert threading.current_thread().name not in trim.threads
    assert trimmer.stats()["trims"] == len(trim.threads)
    assert engine._heap()["trims"] == len(trim.threads)


def test_requests_coalesce_and_none_is_lost():
    """While a trim runs, requests join one waiting trim; it runs after (it may find more to free)."""
    trim = BlockingTrim()
    trimmer = HeapTrimmer(trim)
    first = trimmer.request("a")
    _wait_running(trim)
    waiting = [trimmer.request(w) for w in "bcd"]
    assert waiting[0] is waiting[1] is waiting[2] is not first
    trim.release.set()
    waiting[0].result(timeout=10)
    assert trimmer.trims == 2
    assert trimmer.last["after"] == "b"


def test_trim_off(monkeypatch):
    monkeypatch.setenv("MTSERVE_TRIM_HEAP", "0")
    trim = BlockingTrim()
    assert HeapTrimmer(trim).request("x") is None
    assert not trim.threads


@glibc
def test_trim_gives_freed_heap_back():
    """Freed blocks below one still in use stay resident until malloc_trim hands their pages back."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(16 * 1024) for _ in range(2048)]  # 32 MiB, below the mmap threshold
    for b in blocks:
        ctypes.memset(b, 1, 16 * 1024)
    for i, b in enumerate(blocks):
        if i % 64 != 63:  # keep every 64th: nothing freed reaches the top of the heap
            libc.free(b)
    try:
        result = HeapTrimmer().request("test").result(timeout=30)
        assert result["released_bytes"] > 16 * 2**20
        assert result["thread"].startswith("mtserve-heap-trim")
    finally:
        for b in blocks[63::64]:
            libc.free(b)


ARENAS = """
import ctypes, re, sys, tempfile, threading
sys.path.insert(0, {root!r})
from service.heap import limit_arenas
print("limit", limit_arenas())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.fopen.restype = ctypes.c_void_p
barrier = threading.Barrier(6)
def work():  # all six alive at once: none can take an arena another one left
    libc.malloc(1000)
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
path = tempfile.mktemp()
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(f))
libc.fclose(ctypes.c_void_p(f))
print("arenas", len(re.findall("<heap nr=", open(path).read())))
"""


@glibc
@pytest.mark.parametrize("setting, limit, most", [("2", "2", 2), ("0", "None", 7)])
def test_threads_share_at_most_two_malloc_arenas(setting, limit, most):
    """With the cap (the default), six new threads add one arena between them; without it, one each."""
    env = {"MTSERVE_MALLOC_ARENAS": setting, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", ARENAS.format(root=str(ROOT))],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[:2] == ["limit", limit]
    assert int(out[3]) <= most
    if setting == "0":
        assert int(out[3]) > 2  # the test can tell the difference


def test_arena_cap_leaves_an_environment_setting_alone(monkeypatch):
    calls = []

    def fake(name, argtypes, restype=ctypes.c_int):
        return (lambda param, value: calls.append((param, value)) or 1) if name == "mallopt" else None

    monkeypatch.setattr(heap, "_libc_function", fake)
    cases = [({}, 2), ({"MTSERVE_MALLOC_ARENAS": "3"}, 3), ({"MTSERVE_MALLOC_ARENAS": "0"}, None)]
    cases += [({"MALLOC_ARENA_MAX": "4"}, None), ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, None)]
    for env, want in cases:
        for key in ("MTSERVE_MALLOC_ARENAS", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(heap, "_arenas_set", None)
        calls.clear()
        assert heap.limit_arenas() == want, env
        assert calls == ([(heap.M_ARENA_MAX, want)] if want else [])
        assert heap.limit_arenas() == want  # once per process
        assert len(calls) <= 1
