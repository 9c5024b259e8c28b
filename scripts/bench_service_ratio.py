"""Service throughput over raw engine throughput, and ``/predict`` latency at several concurrencies.

1. raw: the bundle run by ``service.engine.OrtEngine`` (the server's own runner: no HTTP, no queue) on
   batches of ``--batch-size`` rows mixing every task, in this process while the server idles: rows/s
   and CPU ms per row.
2. service: ``mtserve serve`` with ``--max-batch-size`` = that batch size; closed-loop clients keep
   ``--concurrency`` requests in flight on ``/v2/models/{task}/infer`` with an FP32 tensor (Triton
   binary tensor extension, or JSON with ``--encoding json``), tasks mixed uniformly: rows/s and the
   server's CPU ms per row. ratio = service / raw (target >= 0.9); cpu_ratio the same per CPU-second.
   Raw and service runs alternate ``--repeat`` times, so load from elsewhere hits both.
3. ``POST /predict/{task}`` with a JPEG, tasks mixed, at concurrency 1, 8, 32: requests/s, p50, p99;
   from /metrics, the share of shared-trunk batches that mixed tasks.

A thin driver over ``service/bench`` (engine_bench, loadgen, payloads, server); ``mtserve bench
overhead`` is the P1 figure of the same comparison.

    .venv/bin/python scripts/bench_service_ratio.py bundles/demo --threads 2 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.bundle import load_bundle
from service.bench import loadgen, payloads, server
from service.bench.engine_bench import make_engine, time_batches


def raw_run(engine, tasks: list[str], batch: int, seconds: float) -> tuple[float, float]:
    """(rows/s, CPU seconds per row of this process) of the engine on mixed batches."""
    c0 = time.process_time()
    rate, calls = time_batches(engine, tasks, batch, seconds)
    return rate, (time.process_time() - c0) / (batch * (len(calls) + 1))  # + its untimed first call


def service_run(port: int, pid: int, reqs: dict[str, bytes], clients: int, seconds: float) -> tuple:
    """(load summary, server CPU seconds per request, batch statistics) of a closed-loop run."""
    workers = [loadgen.task_mix(list(reqs), "uniform")] * clients
    loadgen.run(loadgen.closed_loop(port, reqs, workers, 1.0, 0.0))  # warm-up, not counted
    before, cpu0, t0 = server.scrape_batches(port), server.cpu_seconds(pid), time.perf_counter()
    res = loadgen.run(loadgen.closed_loop(port, reqs, workers, seconds, 0.0))
    wall, s = time.perf_counter() - t0, res.summary()
    cpu = (server.cpu_seconds(pid) - cpu0) / max(s["requests"], 1)
    return s, cpu, server.batch_delta(before, server.scrape_batches(port), wall)


def _ok(summary: dict) -> int:
    return sum(n for code, n in summary["codes"].items() if code.startswith("2"))


def ratio_runs(args, manifest, port: int, pid: int) -> dict:
    tasks, rows = list(manifest.tasks), args.rows_per_request
    clients = args.concurrency or max(1, 2 * args.batch_size // rows)
    reqs = payloads.tensor_requests(manifest, tasks, rows, args.encoding)
    engine = None if args.skip_raw else make_engine(args.bundle, args.threads)
    runs = []
    try:
        for _ in range(args.repeat):
            raw, raw_cpu = raw_run(engine, tasks, args.batch_size, args.seconds) if engine else (None, None)
            s, cpu, batches = service_run(port, pid, reqs, clients, args.seconds)
            svc, svc_cpu = _ok(s) * rows / args.seconds, cpu / rows
            runs.append(
                {
                    "raw_rows_per_s": round(raw, 1) if raw else None,
                    "service_rows_per_s": round(svc, 1),
                    "ratio": round(svc / raw, 3) if raw else None,
                    "raw_cpu_ms_per_row": round(raw_cpu * 1e3, 3) if raw_cpu else None,
                    "service_cpu_ms_per_row": round(svc_cpu * 1e3, 3),
                    "cpu_ratio": round(raw_cpu / svc_cpu, 3) if raw_cpu else None,
                    **{k: s[k] for k in ("p50_ms", "p99_ms", "codes")},
                    **batches,
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    finally:
        if engine:
            engine.stop()
    route = f"/v2/models/{{task}}/infer FP32 ({args.encoding})"
    out = {"service": {"route": route, "concurrency": clients, "rows_per_request": rows, "runs": runs}}
    if engine:
        out["ratio_median"] = float(np.median([r["ratio"] for r in runs]))
        out["cpu_ratio_median"] = float(np.median([r["cpu_ratio"] for r in runs]))
        print(f"ratio (median of {len(runs)}): {out['ratio_median']}, CPU: {out['cpu_ratio_median']}")
    return out


def predict_runs(args, manifest, port: int, pid: int) -> list[dict]:
    reqs = payloads.jpeg_requests(manifest, list(manifest.tasks))
    rows = []
    for clients in [int(v) for v in args.latency.split(",") if v]:
        s, _, batches = service_run(port, pid, reqs, clients, args.seconds)
        rows.append(
            {"concurrency": clients, "requests_per_s": round(_ok(s) / args.seconds, 1)}
            | {k: s[k] for k in ("p50_ms", "p99_ms", "codes")}
            | batches
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=0, help="default: 2 x batch size / rows per request")
    p.add_argument("--rows-per-request", type=int, default=1)
    p.add_argument("--encoding", choices=["binary", "json"], default="binary")
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--batching", choices=["cross-task", "per-task"], default="cross-task")
    p.add_argument("--latency", default="1,8,32", help="concurrencies for the /predict run ('' to skip)")
    p.add_argument("--skip-raw", action="store_true")
    p.add_argument("--repeat", type=int, default=3, help="raw and service runs, alternating")
    p.add_argument("--json-out")
    args = p.parse_args()
    m = load_bundle(args.bundle, verify_sha256=False).manifest
    result: dict = {"bundle": f"{m.name} {m.version} ({m.backbone}, {m.plan})"}
    result |= {"batch_size": args.batch_size, "threads": args.threads, "cpus": len(os.sched_getaffinity(0))}
    extra = ["--max-batch-size", str(args.batch_size), "--max-wait-ms", str(args.max_wait_ms)]
    with server.mtserve(args.bundle, args.threads, [*extra, "--batching", args.batching]) as (port, proc):
        result |= ratio_runs(args, m, port, proc.pid)
        result["predict"] = predict_runs(args, m, port, proc.pid)
    print(server.dump(result))
    if args.json_out:
        Path(args.json_out).write_text(server.dump(result) + "\n")


if __name__ == "__main__":
    main()
