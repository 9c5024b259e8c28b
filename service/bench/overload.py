"""Overload: an open loop at a multiple of the measured capacity against a real `mtserve serve`.

1. capacity: closed loop (``2 x max_batch_size`` clients) for a few seconds: answers/s;
2. overload: Poisson arrivals at ``factor x capacity`` for ``seconds``, each request on a keep-alive
   connection from a large pool (latency from the scheduled arrival: no coordinated omission);
3. the server's resident memory sampled every 50 ms before, during and after; then a health check.

What it reports is behaviour, not speed: every answer's status, whether each 429 carried
``Retry-After`` and a JSON error body, how fast the 429s came back, the latency of the admitted
requests (200 or 504), the RSS before/peak/after, and whether the server still answers afterwards.
``tests/test_overload.py`` runs it briefly on the tiny bundle; ``scripts/bench_overload.py`` is the
full-length run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.bundle import load_bundle
from service.bench import loadgen, payloads, server


@dataclass
class Answer:
    code: int
    latency: float  # seconds from the scheduled arrival
    retry_after: bool = False
    error_json: bool = False  # body is {"error": {"code": ..., "message": ...}}
    transport: str = ""  # 599: the client-side exception (no HTTP answer)


@dataclass
class Run:
    offered_rps: float
    seconds: float
    answers: list[Answer] = field(default_factory=list)
    sent: int = 0
    unfinished: int = 0
    window_s: float = 0.0


class _Pool(loadgen._Pool):
    """Keep-alive connections, each dropped after ``expiry`` s idle: uvicorn closes idle ones after 5 s,
    and a request written on a connection the server is closing gets no answer (clients such as httpx
    expire theirs for the same reason)."""

    def __init__(self, port: int, limit: int, expiry: float = 2.0):
        super().__init__(port, limit)
        self.expiry = expiry
        self.since: dict[int, float] = {}

    async def get(self):
        while True:
            conn = await super().get()
            idle = time.monotonic() - self.since.pop(id(conn), time.monotonic())
            if idle < self.expiry:
                return conn
            await super().put(conn, False)  # closes it

    async def put(self, conn, ok: bool) -> None:
        if ok:
            self.since[id(conn)] = time.monotonic()
        await super().put(conn, ok)


async def _exchange(conn, request: bytes) -> Answer:
    reader, writer = conn
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    m = loadgen._CLEN.search(head)
    body = await reader.readexactly(int(m.group(1)) if m else 0)
    code = int(head[9:12])
    a = Answer(code, 0.0)
    if code >= 400:
        a.retry_after = b"\r\nretry-after:" in head.lower()
        try:
            err = json.loads(body)["error"]
            a.error_json = isinstance(err["code"], str) and isinstance(err["message"], str)
        except (ValueError, KeyError, TypeError):
            a.error_json = False
    return a


async def open_loop(
    port: int,
    requests: dict[str, bytes],
    rate: float,
    seconds: float,
    max_conns: int = 4096,
    drain: float = 30.0,
    seed: int = 0,
) -> Run:
    """Poisson arrivals at ``rate``/s for ``seconds``, tasks uniform; every answer kept."""
    rng = np.random.default_rng(seed)
    names = list(requests)
    n = max(1, int(rate * seconds))
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    picks = rng.integers(0, len(names), n)
    pool, run = _Pool(port, max_conns), Run(rate, seconds)

    async def one(k: int, t0: float, at: float) -> None:
        request = requests[names[k]]
        conn = await pool.get()
        ok = True
        try:
            a = await _exchange(conn, request)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            a, ok = Answer(599, 0.0, transport=f"{type(exc).__name__}: {exc}"[:120]), False
        await pool.put(conn, ok)
        now = time.perf_counter()
        a.latency = now - (t0 + at)
        run.answers.append(a)
        run.window_s = max(run.window_s, now - t0)

    run.sent, run.unfinished = await loadgen.run_schedule(arrivals, picks, seconds, one, drain)
    for _, w in pool.idle:
        w.close()
    return run


class RssSampler:
    """Resident memory of a process, sampled in a thread every ``period`` s."""

    def __init__(self, pid: int, period: float = 0.05):
        self.pid, self.period, self.samples = pid, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(server.rss_bytes(self.pid, children=False))
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values) * 1e3, q)), 2) if values else None


def summarize(run: Run, capacity: float) -> dict:
    codes = Counter(a.code for a in run.answers)
    rejected = [a for a in run.answers if a.code == 429]
    admitted = [a for a in run.answers if a.code in (200, 504)]
    ok = [a.latency for a in run.answers if a.code == 200]
    return {
        "capacity_rps": round(capacity, 1),
        "offered_rps": round(run.offered_rps, 1),
        "sent_rps": round(run.sent / run.seconds, 1),
        "served_rps": round(len(ok) / max(run.seconds, run.window_s), 1),
        "requests": run.sent,
        "codes": {str(k): v for k, v in sorted(codes.items())},
        "unfinished": run.unfinished,
        "transport_errors": dict(Counter(a.transport for a in run.answers if a.code == 599).most_common(5)),
        "rejected_429": len(rejected),
        "429_without_retry_after": sum(not a.retry_after for a in rejected),
        "429_without_json_error": sum(not a.error_json for a in rejected),
        "429_p50_ms": _pct([a.latency for a in rejected], 50),
        "429_p99_ms": _pct([a.latency for a in rejected], 99),
        "admitted": len(admitted),
        "admitted_p50_ms": _pct([a.latency for a in admitted], 50),
        "admitted_p99_ms": _pct([a.latency for a in admitted], 99),
        "admitted_max_ms": _pct([a.latency for a in admitted], 100),
        "ok_max_ms": _pct(ok, 100),
        "window_s": round(run.window_s, 2),
    }


@contextlib.contextmanager
def serve(bundle: str | Path, args: list[str], row_ms: float = 0.0) -> Iterator[tuple[int, subprocess.Popen]]:
    """`mtserve serve BUNDLE ARGS` on a free loopback port (with ``row_ms``: the engine slowed down per
    row, service/bench/slow_serve.py); yields (port, process) once /readyz is 200."""
    port = server.free_port()
    cmd = [sys.executable, "-m", "service.bench.slow_serve", "--row-ms", str(row_ms), str(bundle)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args]
    with server.running(cmd, port) as proc:
        yield port, proc


def overload(
    bundle: str | Path,
    seconds: float = 20.0,
    factor: float = 5.0,
    threads: int = 2,
    capacity_s: float = 3.0,
    server_args: tuple[str, ...] = (),
    max_batch_size: int = 32,
    row_ms: float = 0.0,
) -> dict:
    """Start a server, measure its capacity, overload it, check it afterwards; the figures as a dict."""
    m = load_bundle(bundle, verify_sha256=False).manifest
    tasks = list(m.tasks)
    reqs = payloads.tensor_requests(m, tasks)
    args = ["--threads", str(threads), "--max-batch-size", str(max_batch_size), *server_args]
    with serve(bundle, args, row_ms) as (port, proc):
        mix = loadgen.task_mix(tasks, "uniform")
        cap = loadgen.run(loadgen.closed_loop(port, reqs, [mix] * (2 * max_batch_size), capacity_s, 0.5))
        capacity = cap.summary()["throughput_rps"]
        time.sleep(0.5)
        before = server.rss_bytes(proc.pid, children=False)
        with RssSampler(proc.pid) as during:
            run = loadgen.run(open_loop(port, reqs, factor * capacity, seconds))
        time.sleep(1.0)
        after = server.rss_bytes(proc.pid, children=False)
        ready = server.get(port, "/readyz")[0]
        check = loadgen.run(loadgen.closed_loop(port, reqs, [mix], 0.5, 0.0))
    out = summarize(run, capacity) | {
        "factor": factor,
        "seconds": seconds,
        "rss_before_mib": round(before / 2**20, 1),
        "rss_peak_mib": round(max(during.samples, default=before) / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "readyz_after": ready,
        "codes_after": {str(k): v for k, v in sorted(check.codes.items())},
        "server_args": args,
        "engine_row_ms_added": row_ms,
    }
    return out
