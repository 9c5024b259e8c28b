"""Scenario ``engine``: raw onnxruntime through service.engine.OrtEngine (the server's own runner),
no HTTP, no queue: images/s per batch size on batches that mix the tasks, and batch-1 latency."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from contract.bundle import load_bundle
from service.engine import OrtEngine


def mixed_tasks(tasks: Sequence[str], n: int) -> list[str]:
    """``n`` rows over the tasks, as the fair batcher forms them: equal quanta, each task contiguous."""
    k = min(len(tasks), n)
    return [tasks[i * k // n] for i in range(n)]


def make_engine(bundle: str | Path, threads: int, device: str = "cpu") -> OrtEngine:
    engine = OrtEngine(
        load_bundle(bundle, verify_sha256=False), device=device, threads=threads, warmup_batch_sizes=(1,)
    )
    engine.start()
    return engine


def time_batches(engine: OrtEngine, tasks: Sequence[str], batch: int, seconds: float, min_calls: int = 3):
    """(images/s, per-call seconds) running ``batch`` mixed rows repeatedly for about ``seconds``."""
    x = np.random.default_rng(batch).normal(size=(batch, *engine.manifest.input.size)).astype(np.float32)
    rows = mixed_tasks(tasks, batch)
    engine.infer(x, rows)
    calls: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(calls) < min_calls:
        t0 = time.perf_counter()
        engine.infer(x, rows)
        calls.append(time.perf_counter() - t0)
    return batch * len(calls) / sum(calls), calls


def paced_calls(engine: OrtEngine, tasks: Sequence[str], calls: int, pause_s: float) -> list[float]:
    """Seconds per batch-1 call with ``pause_s`` of sleep between calls: the engine as an idle server
    meets a lone request (caches, the CPU's idle state), the reference of P5's paced client. On these
    VMs a call after a 10 ms pause takes about 2.5x a back-to-back one (docs/bench.md, P5)."""
    x = np.random.default_rng(1).normal(size=(1, *engine.manifest.input.size)).astype(np.float32)
    out: list[float] = []
    for k in range(calls):
        rows = [tasks[k % len(tasks)]]
        time.sleep(pause_s)
        t0 = time.perf_counter()
        engine.infer(x, rows)
        out.append(time.perf_counter() - t0)
    return out


def run_engine(
    bundle: str | Path,
    threads: int,
    batch_sizes: Sequence[int],
    seconds: float,
    tasks: Sequence[str] | None = None,
    device: str = "cpu",
) -> dict:
    """The engine scenario's result: one row per batch size."""
    engine = make_engine(bundle, threads, device)
    try:
        tasks = list(tasks or engine.manifest.tasks)
        rows = []
        for b in batch_sizes:
            ips, calls = time_batches(engine, tasks, b, seconds)
            ms = np.asarray(calls) * 1e3
            rows.append(
                {
                    "batch_size": b,
                    "tasks_in_batch": len(set(mixed_tasks(tasks, b))),
                    "images_per_s": round(ips, 1),
                    "call_p50_ms": round(float(np.percentile(ms, 50)), 3),
                    "call_p99_ms": round(float(np.percentile(ms, 99)), 3),
                    "calls": len(calls),
                }
            )
        return {"providers": engine.providers, "threads": threads, "tasks": tasks, "rows": rows}
    finally:
        engine.stop()


def engine_at(result: dict, batch: int) -> float:
    """images/s of the engine result at ``batch`` (the nearest measured batch size)."""
    row = min(result["rows"], key=lambda r: abs(r["batch_size"] - batch))
    return row["images_per_s"]
