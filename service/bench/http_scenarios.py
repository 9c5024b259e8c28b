"""Scenarios over real `mtserve serve` processes: overhead (P1), cross-task (P2), idle latency (P5)."""

from __future__ import annotations

import numpy as np

from service.bench import loadgen, payloads, report, server, wrk
from service.bench.context import BenchContext, BenchModel
from service.bench.engine_bench import make_engine, paced_calls, run_engine, time_batches


def saturate(
    ctx: BenchContext, model: BenchModel, port: int, requests: dict[str, bytes], clients: int
) -> dict:
    """Closed loop, ``clients`` in flight, tasks uniformly mixed (``--loadgen``: wrk sends each task's
    request in turn, the Python generator draws them at random); adds the trunk batch statistics."""
    tool = wrk.pick(ctx.loadgen, one_body=False)  # hey sends one body: not for a task mix
    before = server.scrape_batches(port)
    if tool == "wrk":
        reqs = [wrk.from_raw(r) for r in requests.values()]
        res = wrk.run(port, reqs, clients, seconds=ctx.seconds, warmup_s=model.warmup_s)
    else:
        mix = loadgen.task_mix(list(requests), "uniform")
        closed = loadgen.closed_loop(port, requests, [mix] * clients, ctx.seconds, model.warmup_s)
        res = loadgen.run(closed).summary()
    return res | {"clients": clients} | server.batch_delta(before, server.scrape_batches(port))


def overhead(ctx: BenchContext, model: BenchModel) -> dict:
    """P1: service at saturation (tensor via /v2, JPEG via /predict) / engine at the same batch size.

    The engine (same process as the load generator, the server idle meanwhile) is timed before,
    between and after the service runs (one server per ``--service-workers`` value); each route's
    ratio uses the mean of the two timings around it, so the host's drift within a run (the engine
    alone moved from 4,960 to 3,140 images/s in one run here) hits both sides.
    """
    result = ctx.header("overhead", model, f"P1 service / engine at saturation ({model.key})")
    b = ctx.max_batch_size
    eng = run_engine(model.bundle, ctx.threads, sorted({1, 8, b}), ctx.seconds / 3, device=ctx.device)
    rows, samples = _saturated_services(ctx, model)
    figure = {}
    for row in rows:
        row["ratio"] = round(row["throughput_rps"] / row["engine_ips_at_max_batch"], 3)
    for row in saturation_rows(rows):
        row["saturation"] = True
        suffix = "" if row["workers"] == ctx.service_workers[0] else f"_w{row['workers']}"
        figure[("P1_tensor" if row["route"].startswith("/v2") else "P1_jpeg") + suffix] = row["ratio"]
    result |= {
        "engine": eng,
        "engine_samples_at_max_batch": [round(v, 1) for v in samples],
        "rows": rows,
        "figure": figure,
    }
    cols = ["workers", "route", "tool", "clients", "throughput_rps", "p50_ms", "p99_ms", "mean_trunk_batch"]
    md = report.table(eng["rows"], ["batch_size", "tasks_in_batch", "images_per_s", "call_p50_ms"])
    md += "\n" + report.table(rows, [*cols, "engine_ips_at_max_batch", "ratio", "saturation"])
    md += f"\nengine at batch {b} before, between and after the routes: "
    md += f"{result['engine_samples_at_max_batch']} images/s (a route's ratio: over the two around it)\n"
    labels = [f"engine bs{r['batch_size']}" for r in eng["rows"]]
    labels += [f"{r['route']}\nworkers {r['workers']}" for r in rows]
    values = [r["images_per_s"] for r in eng["rows"]] + [r["throughput_rps"] for r in rows]
    report.write(
        ctx.out, f"overhead-{model.key}", result, md, lambda ax: report.bars(ax, labels, values, "images/s")
    )
    return result


def saturation_rows(rows: list[dict]) -> list[dict]:
    """Per (workers, route), the row of the highest throughput among its client counts: the service's
    saturation, as a concurrency sweep finds it (Triton's perf_analyzer)."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["workers"], row["route"])
        if key not in best or row["throughput_rps"] > best[key]["throughput_rps"]:
            best[key] = row
    return list(best.values())


def _saturated_services(ctx: BenchContext, model: BenchModel) -> tuple[list[dict], list[float]]:
    """Per ``--service-workers`` value one server, loaded on each route by ``ctx.saturation`` x max batch
    clients in turn; the engine's images/s at the max batch timed before and after every route, each
    row with the mean of the two around its route."""
    m = model.manifest()
    tasks = list(m.tasks)
    b = ctx.max_batch_size
    engine = make_engine(model.bundle, ctx.threads, ctx.device)
    samples = [time_batches(engine, tasks, b, ctx.seconds / 2)[0]]
    rows = []
    try:
        for workers in ctx.service_workers:
            args = ctx.server_args(*ctx.workers_args(workers))
            with server.mtserve(model.bundle, ctx.threads, args) as (port, _):
                for route, reqs in (
                    ("/v2 FP32 tensor", payloads.tensor_requests(m, tasks)),
                    ("/predict JPEG", payloads.jpeg_requests(m, tasks)),
                ):
                    points = [saturate(ctx, model, port, reqs, k * b) for k in ctx.saturation]
                    samples.append(time_batches(engine, tasks, b, ctx.seconds / 2)[0])
                    around = round(float(np.mean(samples[-2:])), 1)  # the engine before and after
                    rows += [
                        {"workers": workers, "route": route, **load, "saturation": False}
                        | {"engine_ips_at_max_batch": around}
                        for load in points
                    ]
    finally:
        engine.stop()
    return rows, samples


def at_target(points: list[dict], target_ms: float) -> float:
    """Highest achieved throughput among the open-loop points that met the p99 target and answered
    everything with 200 (past saturation the p99 explodes, so those points drop out)."""
    ok = [
        p["throughput_rps"]
        for p in points
        if p["p99_ms"] <= target_ms and p["unfinished"] == 0 and set(p["codes"]) <= {"200"}
    ]
    return max(ok, default=0.0)


def interleaved(
    ctx: BenchContext,
    model: BenchModel,
    ports: dict[str, int],
    reqs: dict[str, dict[str, bytes]],
    clients: list,
    probs: np.ndarray,
) -> dict[str, dict]:
    """Closed loop on every server, then an open-loop sweep where each rate runs on every server in
    turn (servers up side by side: load drift from other processes hits all of them alike).
    Rates are fractions of the first server's closed-loop throughput."""
    runs: dict[str, dict] = {}
    for name, port in ports.items():
        before = server.scrape_batches(port)
        res = loadgen.run(loadgen.closed_loop(port, reqs[name], clients, ctx.seconds, model.warmup_s))
        after = server.scrape_batches(port)  # zeros on a peer without mtserve's /metrics
        runs[name] = {"closed": res.summary() | server.batch_delta(before, after), "open": []}
    first = runs[next(iter(ports))]["closed"]["throughput_rps"]
    rates = [round(f * first, 1) for f in ctx.rates]
    for i, rate in enumerate(rates):
        for name, port in ports.items():
            res = loadgen.run(
                loadgen.open_loop(port, reqs[name], probs, rate, ctx.seconds, model.warmup_s, seed=i, drain=5)
            )
            runs[name]["open"].append(res.summary())
    for r in runs.values():
        r["at_p99_target_rps"] = at_target(r["open"], model.p99_target_ms)
    return runs


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def cross_task(ctx: BenchContext, model: BenchModel) -> dict:
    """P2: the same 8-task bundle served twice, cross-task and per-task batching, side by side;
    closed loop with one client per task (uniform) or 8 clients on the Zipf mix, then open loop."""
    result = ctx.header("cross-task", model, f"P2 cross-task vs per-task batching ({model.key}, 8 tasks)")
    result["bundle"] = str(model.bundle8)
    m = model.manifest("bundle8")
    tasks = list(m.tasks)[:8]
    reqs = payloads.jpeg_requests(m, tasks)
    modes = ("cross-task", "per-task")
    runs: dict[str, dict] = {}
    with (
        server.mtserve(model.bundle8, ctx.threads, ctx.server_args("--batching", modes[0])) as (p0, _),
        server.mtserve(model.bundle8, ctx.threads, ctx.server_args("--batching", modes[1])) as (p1, _),
    ):
        for mix in ctx.mixes:
            probs = loadgen.task_mix(tasks, mix)
            clients = tasks if mix == "uniform" else [probs] * len(tasks)
            got = interleaved(
                ctx,
                model,
                dict(zip(modes, (p0, p1), strict=True)),
                dict.fromkeys(modes, reqs),
                clients,
                probs,
            )
            for mode, r in got.items():
                runs[f"{mode} {mix}"] = {"mode": mode, "mix": mix, **r}
    rows, figure = [], {}
    for mix in ctx.mixes:
        c, p = runs[f"cross-task {mix}"], runs[f"per-task {mix}"]
        figure[f"P2_{mix}_closed"] = _ratio(c["closed"]["throughput_rps"], p["closed"]["throughput_rps"])
        figure[f"P2_{mix}_at_p99"] = _ratio(c["at_p99_target_rps"], p["at_p99_target_rps"])
        for r in (c, p):
            rows.append(
                {
                    "mode": r["mode"],
                    "mix": mix,
                    "closed_rps": r["closed"]["throughput_rps"],
                    "closed_p50_ms": r["closed"]["p50_ms"],
                    "closed_p99_ms": r["closed"]["p99_ms"],
                    "mean_trunk_batch": r["closed"]["mean_trunk_batch"],
                    "mean_tasks_per_batch": r["closed"]["mean_tasks_per_batch"],
                    f"rps_at_p99<={model.p99_target_ms:g}ms": r["at_p99_target_rps"],
                    "tool": r["closed"]["tool"],
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


def idle(ctx: BenchContext, model: BenchModel, requests: int = 200, pause_s: float = 0.01) -> dict:
    """P5: single requests at idle (one client, a pause between requests), p50 minus the engine's
    batch-1 p50 met the same way (a call after the same pause, measured before and after the servers:
    an idle engine is slower than a busy one, and that is not the service's); with the default
    ``max_wait_ms`` and with 0 (dispatch at once). The back-to-back engine p50 is kept beside it."""
    result = ctx.header("idle", model, f"P5 idle latency ({model.key})")
    m = model.manifest()
    tasks = list(m.tasks)
    refs = [_idle_refs(ctx, model, tasks, pause_s)]
    eng_hot = refs[0]["engine_hot_ms"]
    seconds = min(ctx.seconds, requests * (pause_s + eng_hot / 1e3))
    rows = _idle_runs(ctx, model, seconds, pause_s)
    refs.append(_idle_refs(ctx, model, tasks, pause_s))
    ref = {k: float(np.mean([r[k] for r in refs])) for k in refs[0]}
    rows = [
        {"workers": r["workers"]}
        | _idle_row(r["max_wait_ms"], r["route"], r["s"], ref, r["runs_model"], r["decodes"])
        for r in rows
    ]
    figure = {}
    for r in rows:  # the first --workers value keeps the figure's name
        key = f"P5 {r['route']} wait={r['max_wait_ms']:g}"
        if r["workers"] != ctx.service_workers[0]:
            key += f" workers={r['workers']}"
        figure[key] = r["overhead_p50_ms"]
    result |= {
        "pause_s": pause_s,
        "references_ms": [{k: round(v, 3) for k, v in r.items()} for r in refs],
        "rows": rows,
        "figure": figure,
    }
    labels = [f"{r['route']}\nwait {r['max_wait_ms']:g} ms, workers {r['workers']}" for r in rows]
    report.write(
        ctx.out,
        f"idle-{model.key}",
        result,
        report.table(rows, list(rows[0])),
        lambda ax: report.bars(
            ax, labels, [r["overhead_p50_ms"] for r in rows], "p50 - engine bs1 p50 after the same pause (ms)"
        ),
    )
    return result


def _idle_runs(ctx: BenchContext, model: BenchModel, seconds: float, pause_s: float) -> list[dict]:
    """One paced client per route, per ``--service-workers`` value and ``max_wait_ms`` (the default, 0);
    with 0 also the HTTP floor (``GET /healthz``: neither the batcher nor the engine)."""
    m = model.manifest()
    tasks = list(m.tasks)
    rows = []
    runs = [(w, wait) for w in ctx.service_workers for wait in sorted({ctx.max_wait_ms, 0.0}, reverse=True)]
    for workers, wait in runs:
        args = ["--max-batch-size", str(ctx.max_batch_size), "--max-wait-ms", str(wait)]
        args += ["--device", ctx.device, *ctx.workers_args(workers)]
        with server.mtserve(model.bundle, ctx.threads, args) as (port, _):
            routes = [
                ("/v2 FP32 tensor", payloads.tensor_requests(m, tasks), False),
                ("/predict JPEG", payloads.jpeg_requests(m, tasks), True),
            ]
            if wait == 0:
                floor = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                routes.append(("GET /healthz (no model)", dict.fromkeys(tasks, floor), None))
            for route, reqs, decodes in routes:
                mix = loadgen.task_mix(tasks, "uniform")
                res = loadgen.run(
                    loadgen.closed_loop(port, reqs, [mix], seconds, model.warmup_s, pause=pause_s)
                )
                row = {"workers": workers, "max_wait_ms": wait, "route": route}
                rows.append(
                    row | {"runs_model": decodes is not None, "decodes": bool(decodes), "s": res.summary()}
                )
    return rows


def _idle_refs(ctx: BenchContext, model: BenchModel, tasks: list[str], pause_s: float) -> dict[str, float]:
    """The engine's batch-1 p50 back to back and after ``pause_s`` (as the idle client meets it), and
    the decode's after ``pause_s``, in ms."""
    from service.preprocess import load_image

    engine = make_engine(model.bundle, ctx.threads, ctx.device)
    try:
        _, hot = time_batches(engine, tasks, 1, 1.0, min_calls=50)
        paced = paced_calls(engine, tasks, 100, pause_s)
    finally:
        engine.stop()
    m = model.manifest()
    img = payloads.image(m, 0)
    decode = [_timed(lambda: load_image(img, m.input, 40_000_000), pause_s) for _ in range(50)]
    p50 = lambda v: float(np.percentile(v, 50)) * 1e3  # noqa: E731
    return {"engine_hot_ms": p50(hot), "engine_paced_ms": p50(paced), "decode_paced_ms": p50(decode)}


def _idle_row(
    wait: float, route: str, s: dict, ref: dict[str, float], runs_model: bool, decodes: bool
) -> dict:
    """One idle-latency row: p50/p99, the p50 less the engine's paced batch-1 p50 (P5; and less the
    decode's), and less its back-to-back p50 (the figure before the paced reference)."""
    eng = ref["engine_paced_ms"] if runs_model else 0.0  # the HTTP floor runs no model
    hot = ref["engine_hot_ms"] if runs_model else 0.0
    decode = ref["decode_paced_ms"] if decodes else 0.0
    return {
        "max_wait_ms": wait,
        "route": route,
        "requests": s["requests"],
        "p50_ms": s["p50_ms"],
        "p99_ms": s["p99_ms"],
        "engine_bs1_paced_p50_ms": round(eng, 3),
        "decode_paced_p50_ms": round(decode, 3),
        "overhead_p50_ms": round(s["p50_ms"] - eng, 3),
        "overhead_minus_decode_ms": round(s["p50_ms"] - eng - decode, 3),
        "engine_bs1_hot_p50_ms": round(hot, 3),
        "over_hot_engine_ms": round(s["p50_ms"] - hot, 3),
        "tool": s["tool"],
    }


def _timed(fn, pause_s: float = 0.0) -> float:
    import time

    time.sleep(pause_s)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
