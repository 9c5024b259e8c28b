"""P3: resident memory after warm-up, one multi-task bundle against N independent single-task models.

Measured two ways: (a) real `mtserve serve` processes: the multi-task server vs N single-task servers
(one per model: the per-model deployment; the N are identical in architecture, so one is started and
its RSS counted N times); (b) engine processes: one process holding the multi-task engine vs one
process holding all N independent engines (a multi-model server), both warmed up at batch 1.
Run as ``python -m service.bench.memory BUNDLE [BUNDLE...]`` it is the probe of (b): prints RSS.
"""

from __future__ import annotations

import json
import subprocess
import sys

from service.bench import report, server
from service.bench.context import BenchContext, BenchModel

MiB = 2**20


def probe(bundles: list[str], threads: int) -> int:
    """Start one engine per bundle in a fresh process, warm up, return the process RSS in bytes."""
    cmd = [sys.executable, "-m", "service.bench.memory", *bundles, "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=server.ROOT, timeout=600)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["rss"])


def _row(how: str, multi_task: float, independent: float, note: str) -> dict:
    """One comparison, bytes in, MiB out."""
    return {
        "how": how,
        "multi_task_mib": round(multi_task / MiB, 1),
        "independent_mib": round(independent / MiB, 1),
        "ratio": round(multi_task / independent, 3),
        "note": note,
    }


def memory(ctx: BenchContext, model: BenchModel) -> dict:
    result = ctx.header("memory", model, f"P3 memory after warm-up ({model.key})")
    n = len(model.manifest().tasks)
    singles = model.singles[:n]
    with server.mtserve(model.bundle, ctx.threads, ctx.server_args()) as (_, proc):
        mt = server.rss_bytes(proc.pid)
    with server.mtserve(singles[0], ctx.threads, ctx.server_args()) as (_, proc):
        one = server.rss_bytes(proc.pid)
    mt_e = probe([str(model.bundle)], ctx.threads)
    ind_e = probe([str(s) for s in singles], ctx.threads)
    base = probe([], ctx.threads)
    rows = [
        _row(
            f"servers (warm-up bs 1 and {ctx.max_batch_size})",
            mt,
            n * one,
            f"{n} x one single-task server ({one / MiB:.0f} MiB)",
        ),
        _row(
            "one engine process (warm-up bs 1)",
            mt_e,
            ind_e,
            f"{len(singles)} engines in one process; empty process {base / MiB:.0f} MiB",
        ),
        _row("engine process minus empty process", mt_e - base, ind_e - base, "model memory only"),
    ]
    acc = model.manifest().accounting
    result |= {
        "tasks": n,
        "singles": [str(s) for s in singles],
        "rows": rows,
        "accounting": acc.model_dump() if acc else None,
        "figure": {"P3": rows[0]["ratio"]},
    }
    labels = [f"{r['how'][:22]}\n{k}" for r in rows for k in ("multi-task", "independent")]
    values = [v for r in rows for v in (r["multi_task_mib"], r["independent_mib"])]
    report.write(
        ctx.out,
        f"memory-{model.key}",
        result,
        report.table(rows, list(rows[0])),
        lambda ax: report.bars(ax, labels, values, "resident memory (MiB)"),
    )
    return result


def main() -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("bundles", nargs="*")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import numpy as np  # noqa: F401  (the empty process imports what the others import)
    import onnxruntime  # noqa: F401

    from service.bench.engine_bench import make_engine

    engines = [make_engine(b, args.threads) for b in args.bundles]
    print(json.dumps({"engines": len(engines), "rss": server.rss_bytes(__import__("os").getpid(), False)}))


if __name__ == "__main__":
    main()
