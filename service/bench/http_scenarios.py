"""Scenarios over real `mtserve serve` processes: overhead (P1), cross-task (P2), idle latency (P5)."""

from __future__ import annotations

import numpy as np

from service.bench import loadgen, payloads, report, server
from service.bench.context import Ctx, Model
from service.bench.engine_bench import engine_at, make_engine, run_engine, time_batches


def saturate(ctx: Ctx, model: Model, port: int, requests: dict[str, bytes], clients: int) -> dict:
    """Closed loop, ``clients`` in flight, tasks uniformly mixed; adds the trunk batch statistics."""
    mix = loadgen.task_mix(list(requests), "uniform")
    before = server.scrape_batches(port)
    res = loadgen.run(loadgen.closed_loop(port, requests, [mix] * clients, ctx.seconds, model.warmup_s))
    return res.summary() | {"clients": clients} | server.batch_delta(before, server.scrape_batches(port))


def overhead(ctx: Ctx, model: Model) -> dict:
    """P1: service at saturation (tensor via /v2, JPEG via /predict) / engine at the same batch size."""
    result = ctx.header("overhead", model, f"P1 service / engine at saturation ({model.key})")
    m = model.manifest()
    tasks = list(m.tasks)
    b = ctx.max_batch_size
    eng = run_engine(model.bundle, ctx.threads, sorted({1, 8, b}), ctx.seconds / 2)
    rows = []
    with server.mtserve(model.bundle, ctx.threads, ctx.server_args()) as (port, _):
        for route, reqs in (
            ("/v2 FP32 tensor", payloads.tensor_requests(m, tasks)),
            ("/predict JPEG", payloads.jpeg_requests(m, tasks)),
        ):
            row = {"route": route} | saturate(ctx, model, port, reqs, 2 * b)
            row["engine_ips_at_max_batch"] = engine_at(eng, b)
            row["ratio"] = round(row["throughput_rps"] / engine_at(eng, b), 3)
            row["engine_ips_at_mean_batch"] = engine_at(eng, row["mean_trunk_batch"])
            rows.append(row)
    result |= {
        "engine": eng,
        "rows": rows,
        "figure": {"P1_tensor": rows[0]["ratio"], "P1_jpeg": rows[1]["ratio"]},
    }
    cols = [
        "route",
        "clients",
        "throughput_rps",
        "p50_ms",
        "p99_ms",
        "mean_trunk_batch",
        "engine_ips_at_max_batch",
        "ratio",
    ]
    md = report.table(eng["rows"], ["batch_size", "tasks_in_batch", "images_per_s", "call_p50_ms"])
    md += "\n" + report.table(rows, cols)
    labels = [f"engine bs{r['batch_size']}" for r in eng["rows"]] + [r["route"] for r in rows]
    values = [r["images_per_s"] for r in eng["rows"]] + [r["throughput_rps"] for r in rows]
    report.write(
        ctx.out, f"overhead-{model.key}", result, md, lambda ax: report.bars(ax, labels, values, "images/s")
    )
    return result


def at_target(points: list[dict], target_ms: float) -> float:
    """Highest achieved throughput among the points that met the p99 target with no errors."""
    ok = [
        p["throughput_rps"]
        for p in points
        if p["p99_ms"] <= target_ms and p["unfinished"] == 0 and set(p["codes"]) <= {"200"}
    ]
    return max(ok, default=0.0)


def sweep(ctx: Ctx, model: Model, port: int, reqs: dict[str, bytes], probs: np.ndarray, rates: list[float]):
    out = []
    for i, rate in enumerate(rates):
        res = loadgen.run(
            loadgen.open_loop(port, reqs, probs, rate, ctx.seconds, model.warmup_s, seed=i, drain=5)
        )
        out.append(res.summary())
    return out


def cross_task(ctx: Ctx, model: Model) -> dict:
    """P2: the same 8-task bundle, cross-task vs per-task batching; closed loop with one client per
    task, then an open-loop sweep at the same absolute rates for both modes."""
    result = ctx.header("cross-task", model, f"P2 cross-task vs per-task batching ({model.key}, 8 tasks)")
    result["bundle"] = str(model.bundle8)
    m = model.manifest("bundle8")
    tasks = list(m.tasks)[:8]
    reqs = payloads.jpeg_requests(m, tasks)
    runs: dict[str, dict] = {}
    rates: dict[str, list[float]] = {}
    for mode in ("cross-task", "per-task"):
        with server.mtserve(model.bundle8, ctx.threads, ctx.server_args("--batching", mode)) as (port, _):
            for mix in ctx.mixes:
                probs = loadgen.task_mix(tasks, mix)
                clients = tasks if mix == "uniform" else [probs] * len(tasks)
                before = server.scrape_batches(port)
                closed = loadgen.run(loadgen.closed_loop(port, reqs, clients, ctx.seconds, model.warmup_s))
                closed_row = closed.summary() | server.batch_delta(before, server.scrape_batches(port))
                if mode == "cross-task":
                    rates[mix] = [round(f * closed_row["throughput_rps"], 1) for f in ctx.rates]
                points = sweep(ctx, model, port, reqs, probs, rates[mix])
                runs[f"{mode} {mix}"] = {
                    "mode": mode,
                    "mix": mix,
                    "closed_8_clients": closed_row,
                    "open": points,
                    "at_p99_target_rps": at_target(points, model.p99_target_ms),
                }
    rows, figure = [], {}
    for mix in ctx.mixes:
        c, p = runs[f"cross-task {mix}"], runs[f"per-task {mix}"]
        closed = c["closed_8_clients"]["throughput_rps"] / max(p["closed_8_clients"]["throughput_rps"], 1e-9)
        at = c["at_p99_target_rps"] / p["at_p99_target_rps"] if p["at_p99_target_rps"] else float("inf")
        figure[f"P2_{mix}_closed"] = round(closed, 3)
        figure[f"P2_{mix}_at_p99"] = round(at, 3) if np.isfinite(at) else None
        for r in (c, p):
            rows.append(
                {
                    "mode": r["mode"],
                    "mix": mix,
                    "closed_rps": r["closed_8_clients"]["throughput_rps"],
                    "closed_p99_ms": r["closed_8_clients"]["p99_ms"],
                    "mean_trunk_batch": r["closed_8_clients"]["mean_trunk_batch"],
                    "mean_tasks_per_batch": r["closed_8_clients"]["mean_tasks_per_batch"],
                    f"rps_at_p99<={model.p99_target_ms:g}ms": r["at_p99_target_rps"],
                }
            )
    result |= {"p99_target_ms": model.p99_target_ms, "runs": runs, "rows": rows, "figure": figure}
    md = report.table(rows, list(rows[0]))
    md += "\nratios: " + ", ".join(f"{k} = {v}" for k, v in figure.items()) + "\n"
    series = {k: v["open"] for k, v in runs.items()}
    report.write(
        ctx.out,
        f"cross-task-{model.key}",
        result,
        md,
        lambda ax: report.curves(ax, series, model.p99_target_ms),
    )
    return result


def idle(ctx: Ctx, model: Model, requests: int = 200, pause_s: float = 0.01) -> dict:
    """P5: single requests at idle (one client, a pause between requests), p50 minus engine batch-1 p50;
    with the default ``max_wait_ms`` and with 0 (dispatch at once)."""
    result = ctx.header("idle", model, f"P5 idle latency ({model.key})")
    m = model.manifest()
    tasks = list(m.tasks)
    engine = make_engine(model.bundle, ctx.threads)
    try:
        _, calls = time_batches(engine, tasks, 1, 1.0, min_calls=50)
    finally:
        engine.stop()
    eng_p50 = float(np.percentile(calls, 50)) * 1e3
    from service.preprocess import load_image

    img = payloads.image(m, 0)
    pre = [_timed(lambda: load_image(img, m.input, 40_000_000)) for _ in range(50)]
    pre_p50 = float(np.percentile(pre, 50)) * 1e3
    seconds = min(ctx.seconds, requests * (pause_s + eng_p50 / 1e3))
    rows = []
    for wait in sorted({ctx.max_wait_ms, 0.0}, reverse=True):
        args = ["--max-batch-size", str(ctx.max_batch_size), "--max-wait-ms", str(wait)]
        with server.mtserve(model.bundle, ctx.threads, args) as (port, _):
            for route, reqs, extra in (
                ("/v2 FP32 tensor", payloads.tensor_requests(m, tasks), 0.0),
                ("/predict JPEG", payloads.jpeg_requests(m, tasks), pre_p50),
            ):
                mix = loadgen.task_mix(tasks, "uniform")
                res = loadgen.run(
                    loadgen.closed_loop(port, reqs, [mix], seconds, model.warmup_s, pause=pause_s)
                )
                s = res.summary()
                rows.append(
                    {
                        "max_wait_ms": wait,
                        "route": route,
                        "requests": s["requests"],
                        "p50_ms": s["p50_ms"],
                        "p99_ms": s["p99_ms"],
                        "engine_bs1_p50_ms": round(eng_p50, 3),
                        "decode_p50_ms": round(extra, 3),
                        "overhead_p50_ms": round(s["p50_ms"] - eng_p50, 3),
                        "overhead_minus_decode_ms": round(s["p50_ms"] - eng_p50 - extra, 3),
                    }
                )
    result |= {
        "rows": rows,
        "figure": {f"P5 {r['route']} wait={r['max_wait_ms']:g}": r["overhead_p50_ms"] for r in rows},
    }
    labels = [f"{r['route']}\nwait {r['max_wait_ms']:g} ms" for r in rows]
    report.write(
        ctx.out,
        f"idle-{model.key}",
        result,
        report.table(rows, list(rows[0])),
        lambda ax: report.bars(ax, labels, [r["overhead_p50_ms"] for r in rows], "p50 - engine bs1 p50 (ms)"),
    )
    return result


def _timed(fn) -> float:
    import time

    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
