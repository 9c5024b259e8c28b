"""Overload: open loop at 5x the measured capacity for 20 s against `mtserve serve` (figures, no asserts).

Writes ``OUT/overload-<bundle name>.json`` and ``.md``: offered and served requests/s, status
counts, 429s (count, Retry-After and JSON body present, p50/p99 latency), admitted requests (200 or
504) p50/p99, the server's RSS before/peak/after, and the health check after the run.

    .venv/bin/python scripts/bench_overload.py bundles/demo --seconds 20 --factor 5 --out results/bench
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.bench.machine import describe
from service.bench.overload import overload
from service.bench.report import table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--factor", type=float, default=5.0, help="offered load / measured capacity")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--row-ms", type=float, default=0.0, help="engine slowed by this per row (compute-bound)")
    p.add_argument("--server-args", default="--queue-size 256 --timeout-ms 5000", help="extra serve flags")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args()
    res = overload(
        args.bundle,
        seconds=args.seconds,
        factor=args.factor,
        threads=args.threads,
        server_args=tuple(args.server_args.split()),
        max_batch_size=args.max_batch_size,
        row_ms=args.row_ms,
    )
    res = {"bundle": args.bundle, "machine": describe()} | res
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"overload-{Path(args.bundle).name}" + (f"-row{args.row_ms:g}ms" if args.row_ms else "")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    rows = [
        {"figure": k, "value": json.dumps(v) if isinstance(v, dict | list) else v} for k, v in res.items()
    ]
    (out / f"{stem}.md").write_text(
        f"### Overload: {args.factor:g}x capacity, {args.seconds:g} s\n\n" + table(rows, ["figure", "value"])
    )
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
