"""P4: mtserve against LitServe serving the same ONNX chain, same JSON payload, same load generator."""

from __future__ import annotations

from importlib.util import find_spec

from service.bench import loadgen, payloads, report, server
from service.bench.context import BenchContext, BenchModel
from service.bench.http_scenarios import interleaved


def peer(ctx: BenchContext, model: BenchModel) -> dict:
    """Closed-loop saturation (2 x max batch clients) and an open-loop sweep at the same rates."""
    result = ctx.header("peer", model, f"P4 mtserve vs LitServe ({model.key})")
    if find_spec("litserve") is None:
        result |= {"skipped": "litserve not installed (pip install -e '.[bench]')", "rows": [], "figure": {}}
        report.write(ctx.out, f"peer-{model.key}", result, result["skipped"] + "\n")
        return result
    m = model.manifest()
    tasks = list(m.tasks)
    mix = loadgen.task_mix(tasks, "uniform")
    reqs = {
        "mtserve": payloads.json_requests(m, tasks),
        "litserve": payloads.json_requests(m, tasks, litserve=True),
    }
    with (
        server.mtserve(model.bundle, ctx.threads, ctx.server_args()) as (p0, _),
        server.litserve_peer(model.bundle, ctx.threads, ctx.max_batch_size, ctx.max_wait_ms) as (p1, _),
    ):
        runs = interleaved(
            ctx, model, {"mtserve": p0, "litserve": p1}, reqs, [mix] * (2 * ctx.max_batch_size), mix
        )
    rates = [p["offered_rps"] for p in runs["mtserve"]["open"]]
    rows = [
        {
            "server": name,
            "closed_rps": r["closed"]["throughput_rps"],
            "closed_p50_ms": r["closed"]["p50_ms"],
            "closed_p99_ms": r["closed"]["p99_ms"],
            f"rps_at_p99<={model.p99_target_ms:g}ms": r["at_p99_target_rps"],
            "tool": r["closed"]["tool"],
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
