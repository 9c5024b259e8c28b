"""Padding on or off on the CPU? Engine-level interleaved A/B (issue 13, item 4).

The same bundle in two OrtEngines (host path): A without buckets, B padded to powers of two up to
the max batch size. Each round runs the same list of batches (random sizes 1..max, tasks drawn
uniformly, as the fair batcher forms them) through A then B, alternating which goes first; the
figure is the median over rounds of B's images/s / A's images/s (> 1: padding faster).

    .venv/bin/python scripts/bench_buckets_cpu.py [--bundle bundles/bench/scale-t10] [--rounds 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.bundle import load_bundle
from service.bench.machine import describe
from service.buckets import default_buckets
from service.engine import OrtEngine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="bundles/bench/scale-t10")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--batches", type=int, default=40, help="batches per round and engine")
    p.add_argument("--out", default="results/bench/buckets-cpu.json")
    args = p.parse_args()
    bundle = load_bundle(args.bundle, verify_sha256=False)
    buckets = default_buckets(args.max_batch_size)
    engines = {
        "off": OrtEngine(bundle, threads=args.threads, warmup_batch_sizes=(1, args.max_batch_size)),
        "pow2": OrtEngine(bundle, threads=args.threads, warmup_batch_sizes=(1,), buckets=buckets),
    }
    for e in engines.values():
        e.start()
    tasks = list(bundle.manifest.tasks)
    rng = np.random.default_rng(0)
    size = bundle.manifest.input.size
    work = []
    for _ in range(args.batches):
        n = int(rng.integers(1, args.max_batch_size + 1))
        work.append((rng.normal(size=(n, *size)).astype(np.float32), sorted(rng.choice(tasks, n).tolist())))
    rows = sum(len(t) for _, t in work)
    ips: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(args.rounds):
        for key in ("off", "pow2") if r % 2 == 0 else ("pow2", "off"):
            t0 = time.perf_counter()
            for x, t in work:
                engines[key].infer(x, t)
            ips[key].append(rows / (time.perf_counter() - t0))
    ratios = [b / a for a, b in zip(ips["off"], ips["pow2"], strict=True)]
    result = {
        "title": "CPU: padding to batch buckets (pow2) vs none, engine images/s, interleaved A/B",
        "machine": describe("cpu"),
        "bundle": args.bundle,
        "tasks": len(tasks),
        "threads": args.threads,
        "buckets": list(buckets),
        "rounds": args.rounds,
        "batches_per_round": args.batches,
        "rows_per_round": rows,
        "images_per_s_median": {k: round(statistics.median(v), 1) for k, v in ips.items()},
        "ratio_pow2_over_off_median": round(statistics.median(ratios), 3),
        "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
        "command": "python scripts/bench_buckets_cpu.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: result[k] for k in ("images_per_s_median", "ratio_pow2_over_off_median", "ratio_min_max")}
        )
    )


if __name__ == "__main__":
    main()
