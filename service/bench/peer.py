"""P4: mtserve against LitServe serving the same ONNX chain, same JSON payload, same load generator."""

from __future__ import annotations

from importlib.util import find_spec

from service.bench import loadgen, payloads, report, server
from service.bench.context import Ctx, Model
from service.bench.http_scenarios import at_target, sweep


def _measure(ctx: Ctx, model: Model, port: int, reqs: dict[str, bytes], rates: list[float] | None):
    tasks = list(reqs)
    mix = loadgen.task_mix(tasks, "uniform")
    closed = loadgen.run(
        loadgen.closed_loop(port, reqs, [mix] * (2 * ctx.max_batch_size), ctx.seconds, model.warmup_s)
    ).summary()
    rates = rates or [round(f * closed["throughput_rps"], 1) for f in ctx.rates]
    points = sweep(ctx, model, port, reqs, mix, rates)
    return {
        "closed": closed,
        "open": points,
        "at_p99_target_rps": at_target(points, model.p99_target_ms),
    }, rates


def peer(ctx: Ctx, model: Model) -> dict:
    """Closed-loop saturation (2 x max batch clients) and an open-loop sweep at the same rates."""
    result = ctx.header("peer", model, f"P4 mtserve vs LitServe ({model.key})")
    if find_spec("litserve") is None:
        result |= {"skipped": "litserve not installed (pip install -e '.[bench]')", "rows": [], "figure": {}}
        report.write(ctx.out, f"peer-{model.key}", result, result["skipped"] + "\n")
        return result
    m = model.manifest()
    tasks = list(m.tasks)
    runs = {}
    with server.mtserve(model.bundle, ctx.threads, ctx.server_args()) as (port, _):
        runs["mtserve"], rates = _measure(ctx, model, port, payloads.json_requests(m, tasks), None)
    with server.litserve_peer(model.bundle, ctx.threads, ctx.max_batch_size, ctx.max_wait_ms) as (port, _):
        runs["litserve"], _ = _measure(
            ctx, model, port, payloads.json_requests(m, tasks, litserve=True), rates
        )
    rows = [
        {
            "server": name,
            "closed_rps": r["closed"]["throughput_rps"],
            "closed_p50_ms": r["closed"]["p50_ms"],
            "closed_p99_ms": r["closed"]["p99_ms"],
            f"rps_at_p99<={model.p99_target_ms:g}ms": r["at_p99_target_rps"],
        }
        for name, r in runs.items()
    ]
    ls_at = runs["litserve"]["at_p99_target_rps"]
    figure = {
        "P4_at_p99": round(runs["mtserve"]["at_p99_target_rps"] / ls_at, 3) if ls_at else None,
        "P4_closed": round(rows[0]["closed_rps"] / max(rows[1]["closed_rps"], 1e-9), 3),
    }
    result |= {
        "p99_target_ms": model.p99_target_ms,
        "rates": rates,
        "runs": runs,
        "rows": rows,
        "figure": figure,
    }
    md = report.table(rows, list(rows[0])) + "\nratios: " + ", ".join(f"{k} = {v}" for k, v in figure.items())
    md += (
        "\n\nLitServe 0.2: `LitAPI(max_batch_size, batch_timeout)`, 1 worker, 1 API server, default queue.\n"
    )
    series = {k: v["open"] for k, v in runs.items()}
    report.write(
        ctx.out, f"peer-{model.key}", result, md, lambda ax: report.curves(ax, series, model.p99_target_ms)
    )
    return result
