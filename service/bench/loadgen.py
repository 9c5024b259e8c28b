"""A small HTTP/1.1 load generator on raw asyncio sockets (keep-alive, loopback only).

Saturating closed loops drive wrk when it is on PATH (service/bench/wrk.py, ``--loadgen``: less CPU per
request, taken from the server under test on a small machine). What wrk/hey cannot do stays here: the
scenarios need an open-loop arrival schedule (Poisson, latency counted from the scheduled arrival so a
slow server cannot slow the generator down: no coordinated omission), a per-request task drawn from a
task mix (uniform or Zipf), per-request routing to that task's URL and prebuilt bodies (JPEG, Triton
binary tensors, JSON). Parsing only the status line and Content-Length keeps it cheap: it costs a
fraction of what the server spends per request.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

_CLEN = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
HOST = "127.0.0.1"


def http_post(path: str, body: bytes, content_type: str, extra: Mapping[str, str] | None = None) -> bytes:
    """A complete keep-alive POST request, ready to write."""
    head = f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {content_type}\r\n"
    head += f"Content-Length: {len(body)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items())
    return head.encode() + b"\r\n" + body


def task_mix(tasks: Sequence[str], kind: str, s: float = 1.1) -> np.ndarray:
    """Probabilities over ``tasks``: uniform, or Zipf with exponent ``s`` (task i gets 1/(i+1)^s)."""
    if kind == "uniform":
        w = np.ones(len(tasks))
    elif kind == "zipf":
        w = 1.0 / np.arange(1, len(tasks) + 1) ** s
    else:
        raise ValueError(f"unknown task mix {kind!r}; use uniform or zipf")
    return w / w.sum()


@dataclass
class Result:
    """What one load run measured (latencies in seconds, of the requests counted)."""

    mode: str
    seconds: float
    offered_rps: float | None = None
    latencies: list[float] = field(default_factory=list)
    codes: Counter = field(default_factory=Counter)
    unfinished: int = 0
    window_s: float = 0.0  # from the first counted arrival to the last counted answer (open loop)

    def summary(self) -> dict:
        lat = np.asarray(self.latencies) * 1e3 if self.latencies else np.zeros(1)
        ok = sum(n for c, n in self.codes.items() if 200 <= c < 300)
        return {
            "tool": "python",
            "mode": self.mode,
            "offered_rps": None if self.offered_rps is None else round(self.offered_rps, 1),
            "throughput_rps": round(ok / max(self.seconds, self.window_s), 1),
            "requests": sum(self.codes.values()),
            "codes": {str(k): v for k, v in sorted(self.codes.items())},
            "unfinished": self.unfinished,
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p90_ms": round(float(np.percentile(lat, 90)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "max_ms": round(float(lat.max()), 3),
        }


class _Pool:
    """Idle keep-alive connections to one port, opened on demand up to ``limit``."""

    def __init__(self, port: int, limit: int):
        self.port, self.limit, self.open = port, limit, 0
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.freed = asyncio.Condition()

    async def get(self):
        async with self.freed:
            while not self.idle and self.open >= self.limit:
                await self.freed.wait()
            if self.idle:
                return self.idle.pop()
            self.open += 1
        return await asyncio.open_connection(HOST, self.port)

    async def put(self, conn, ok: bool) -> None:
        async with self.freed:
            if ok:
                self.idle.append(conn)
            else:
                self.open -= 1
                conn[1].close()
            self.freed.notify()


async def _exchange(conn, request: bytes) -> int:
    reader, writer = conn
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    m = _CLEN.search(head)
    await reader.readexactly(int(m.group(1)) if m else 0)
    return int(head[9:12])


async def _one(
    pool: _Pool, request: bytes, start: float, res: Result, counted: bool, origin: float = 0.0
) -> None:
    conn = await pool.get()
    ok = True
    try:
        code = await _exchange(conn, request)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        code, ok = 599, False
    await pool.put(conn, ok)
    if counted:
        now = time.perf_counter()
        res.latencies.append(now - start)
        res.codes[code] += 1
        res.window_s = max(res.window_s, now - origin)


async def open_loop(
    port: int,
    requests: Mapping[str, bytes],
    probs: np.ndarray,
    rate: float,
    seconds: float,
    warmup: float = 0.5,
    max_conns: int = 512,
    drain: float = 10.0,
    seed: int = 0,
) -> Result:
    """Poisson arrivals at ``rate``/s for ``warmup + seconds``; each a task drawn from ``probs``.

    Only arrivals scheduled after the warm-up count; latency runs from the scheduled arrival;
    throughput divides the answers by the time until the last one (overload shows as a lower rate).
    Requests still running ``drain`` s after the last arrival are cancelled (``unfinished``).
    """
    rng = np.random.default_rng(seed)
    names = list(requests)
    n = max(1, int(rate * (warmup + seconds)))
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    picks = rng.choice(len(names), size=n, p=probs)
    pool, res = _Pool(port, max_conns), Result("open", seconds, rate)

    def job(k: int, t0: float, at: float) -> Awaitable[None]:
        return _one(pool, requests[names[k]], t0 + at, res, at >= warmup, t0 + warmup)

    _, res.unfinished = await run_schedule(arrivals, picks, warmup + seconds, job, drain)
    for _, w in pool.idle:
        w.close()
    return res


async def run_schedule(
    arrivals: Sequence[float],
    picks: Sequence[int],
    until_s: float,
    job: Callable[[int, float, float], Awaitable[None]],
    drain: float,
) -> tuple[int, int]:
    """Open loop: start ``job(pick, t0, at)`` at each scheduled arrival ``at`` (seconds after ``t0``)
    up to ``until_s``, never waiting for answers; then give the running jobs ``drain`` s and cancel the
    rest. Returns (sent, unfinished)."""
    running: set[asyncio.Task] = set()
    sent, t0 = 0, time.perf_counter()
    for at, k in zip(arrivals, picks, strict=True):
        if at > until_s:
            break
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(job(int(k), t0, float(at)))
        running.add(task)
        task.add_done_callback(running.discard)
        sent += 1
    if not running:
        return sent, 0
    _, late = await asyncio.wait(set(running), timeout=drain)
    for task in late:
        task.cancel()
    return sent, len(late)


async def closed_loop(
    port: int,
    requests: Mapping[str, bytes],
    workers: Sequence[str | np.ndarray],
    seconds: float,
    warmup: float = 0.5,
    seed: int = 0,
    pause: float = 0.0,
) -> Result:
    """One client per entry of ``workers``, each a fixed task name or a task mix (probabilities);
    each sends its next request when the previous answered (after ``pause`` s: idle latency)."""
    names = list(requests)
    res = Result("closed", seconds)
    t0 = time.perf_counter()
    t_count, t_end = t0 + warmup, t0 + warmup + seconds

    async def client(i: int, spec) -> None:
        rng = np.random.default_rng(seed + i)
        conn = await asyncio.open_connection(HOST, port)
        try:
            while (start := time.perf_counter()) < t_end:
                task = spec if isinstance(spec, str) else names[rng.choice(len(names), p=spec)]
                code = await _exchange(conn, requests[task])
                if start >= t_count:
                    res.latencies.append(time.perf_counter() - start)
                    res.codes[code] += 1
                if pause:
                    await asyncio.sleep(pause)
        finally:
            conn[1].close()

    await asyncio.gather(*(client(i, w) for i, w in enumerate(workers)))
    return res


def run(coro):
    """Run a load coroutine on uvloop when installed (cheaper per request), else asyncio."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
