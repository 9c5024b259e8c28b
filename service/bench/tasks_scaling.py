"""Scenarios ``tasks-scaling`` and ``mixed-batch`` (issue 13): what many tasks cost the engine.

``tasks-scaling``: the same backbone with 1, 10 and 100 tasks (``scripts/make_scaling_bundles.py``:
resnet10t at 32 px, ``bottom:1``, random weights), uniform mixed load: every batch holds
``max_batch_size`` rows whose tasks are drawn uniformly (the engine at saturation). Reported:
engine images/s (median of interleaved rounds: every bundle runs in every round, in rotating
order, so a noisy neighbour hits all of them alike) and the memory held (CPU: resident set of a
fresh process holding the engine; CUDA: device memory the engine's start-up took), each as a ratio
to the 1-task bundle: "N tasks for the price of one".

``mixed-batch``: engine time of a batch that mixes tasks (a new random mix every call, so every
stem and head call has its own row count) / a fixed-shape batch of the same size (one task, the
same shape every call), with the engine as the server builds it (batch buckets and CUDA graphs per
``--batch-buckets`` / ``--cuda-graphs``) and without buckets: on CUDA the first is the shape-stable
path, the second what cuDNN plan rebuilds cost.

The engines are built as the server builds them: ``--batch-buckets auto`` pads on CUDA only,
``--cuda-graphs on`` captures there. ``python -m service.bench.tasks_scaling --probe BUNDLE ...`` is
the memory probe (one engine in a fresh process; prints JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from contract.bundle import load_bundle
from service.buckets import resolve
from service.engine import OrtEngine

ROOT = Path(__file__).resolve().parents[2]
SCALING_BUNDLES = "bundles/bench/scale-t1,bundles/bench/scale-t10,bundles/bench/scale-t100"
MiB = 2**20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scaling-bundles",
        default=SCALING_BUNDLES,
        help="tasks-scaling: comma list, the first is the reference (scripts/make_scaling_bundles.py)",
    )
    p.add_argument("--batch-buckets", default="auto", help="tasks-scaling, mixed-batch: as mtserve serve")
    p.add_argument("--cuda-graphs", choices=("on", "off"), default="on", help="as mtserve serve")
    p.add_argument(
        "--scaling-rounds", type=int, default=5, help="tasks-scaling, mixed-batch: interleaved rounds"
    )


def build_engine(
    bundle: str | Path, threads: int, device: str, max_batch_size: int, buckets: str, graphs: str
) -> OrtEngine:
    """An engine as ``mtserve serve`` builds it (service.app.build_engine), started."""
    sizes = resolve(buckets, max_batch_size, device)
    engine = OrtEngine(
        load_bundle(bundle, verify_sha256=False),
        device=device,
        threads=threads,
        warmup_batch_sizes=(1, max_batch_size),
        buckets=sizes,
        cuda_graphs=graphs == "on" and device == "cuda",
    )
    engine.start()
    return engine


def uniform_batches(tasks: Sequence[str], rows: int, count: int, size, seed: int = 0):
    """``count`` batches of ``rows`` rows, tasks drawn uniformly, rows sorted by task (the batcher
    hands each task's rows over contiguously)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        idx = np.sort(rng.integers(0, len(tasks), rows))
        out.append((rng.normal(size=(rows, *size)).astype(np.float32), [tasks[i] for i in idx]))
    return out


def _rss_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def probe(argv: Sequence[str]) -> None:
    """Memory probe, in a fresh process: RSS before the engine, after start-up and after batches."""
    p = argparse.ArgumentParser()
    p.add_argument("--probe", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-buckets", default="auto")
    p.add_argument("--cuda-graphs", default="on")
    a = p.parse_args(argv)
    import onnxruntime  # noqa: F401  (its import is not the engine's)

    before = _rss_kib()["VmRSS"]
    engine = build_engine(a.probe, a.threads, a.device, a.max_batch_size, a.batch_buckets, a.cuda_graphs)
    started = _rss_kib()["VmRSS"]
    size = engine.manifest.input.size
    for x, t in uniform_batches(list(engine.manifest.tasks), a.max_batch_size, 10, size):
        engine.infer(x, t)
    after = _rss_kib()
    d = engine.describe()
    print(
        json.dumps(
            {
                "rss_before_kib": before,
                "rss_started_kib": started,
                "rss_after_kib": after["VmRSS"],
                "rss_peak_kib": after["VmHWM"],
                "engine": d,
            }
        )
    )


def memory_probe(
    bundle: str, threads: int, device: str, max_batch_size: int, buckets: str, graphs: str
) -> dict:
    cmd = [
        *(sys.executable, "-m", "service.bench.tasks_scaling", "--probe", bundle),
        *("--threads", str(threads), "--device", device, "--max-batch-size", str(max_batch_size)),
        *("--batch-buckets", buckets, "--cuda-graphs", graphs),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved(
    work: dict[str, tuple[OrtEngine, list]], seconds: float, rounds: int
) -> dict[str, list[float]]:
    """images/s per engine and round; each round runs every engine for ``seconds / rounds`` (at least
    its list of batches once), in an order that rotates from round to round."""
    keys = list(work)
    ips: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            engine, batches = work[k]
            rows, t0 = 0, time.perf_counter()
            while True:
                for x, t in batches:
                    engine.infer(x, t)
                    rows += len(t)
                if time.perf_counter() - t0 >= seconds / rounds:
                    break
            ips[k].append(rows / (time.perf_counter() - t0))
    return ips


def _measure(args: argparse.Namespace, bundles: list[str]) -> tuple[dict, dict, dict]:
    """Memory probes (one engine at a time), then interleaved throughput of every bundle's engine."""
    mbs, dev = args.max_batch_size, args.device
    print("tasks-scaling: memory probes ...", flush=True)
    mem = {b: memory_probe(b, args.threads, dev, mbs, args.batch_buckets, args.cuda_graphs) for b in bundles}
    print("tasks-scaling: throughput ...", flush=True)
    engines = {
        b: build_engine(b, args.threads, dev, mbs, args.batch_buckets, args.cuda_graphs) for b in bundles
    }
    try:
        work = {}
        for b, e in engines.items():
            work[b] = (e, uniform_batches(list(e.manifest.tasks), mbs, 8, e.manifest.input.size))
        ips = interleaved(work, args.seconds, args.scaling_rounds)
        described = {b: e.describe() for b, e in engines.items()}
    finally:
        for e in engines.values():
            e.stop()
    return mem, ips, described


def _engine_memory(probe: dict, dev: str) -> int:
    """Bytes the engine took: device memory on CUDA, RSS growth on the CPU."""
    if dev == "cuda":
        return probe["engine"]["memory_bytes"] or 0
    return (probe["rss_after_kib"] - probe["rss_before_kib"]) * 1024


def _rows(bundles: list[str], mem: dict, ips: dict, described: dict, dev: str) -> list[dict]:
    ref = bundles[0]
    ref_rss, ref_engine = mem[ref]["rss_after_kib"] * 1024, _engine_memory(mem[ref], dev)
    rows = []
    for b in bundles:
        rss, engine_mem, med = (
            mem[b]["rss_after_kib"] * 1024,
            _engine_memory(mem[b], dev),
            statistics.median(ips[b]),
        )
        rows.append(
            {
                "bundle": Path(b).name,
                "tasks": len(load_bundle(b, verify_sha256=False).manifest.tasks),
                "images_per_s": round(med, 1),
                "throughput_ratio": round(med / statistics.median(ips[ref]), 3),
                "rounds_images_per_s": [round(v, 1) for v in ips[b]],
                "process_rss_mib": round(rss / MiB, 1),
                "rss_ratio": round(rss / ref_rss, 3),
                "engine_memory_mib": round(engine_mem / MiB, 1),
                "engine_memory_ratio": round(engine_mem / ref_engine, 3) if ref_engine else None,
                "startup_s": described[b].get("startup_s"),
                "execution": described[b]["execution"],
            }
        )
    return rows


def run_tasks_scaling(args: argparse.Namespace) -> dict:
    from service.bench import report
    from service.bench.machine import describe

    bundles = [b for b in args.scaling_bundles.split(",") if b]
    missing = [b for b in bundles if not (Path(b) / "manifest.json").exists()]
    if missing:
        raise SystemExit(
            f"tasks-scaling: missing {missing}; build them: python scripts/make_scaling_bundles.py"
        )
    dev = args.device
    mem, ips, described = _measure(args, bundles)
    rows = _rows(bundles, mem, ips, described, dev)
    last = rows[-1]
    config = {
        "device": dev, "threads": args.threads, "max_batch_size": args.max_batch_size,
        "batch_buckets": args.batch_buckets, "cuda_graphs": args.cuda_graphs, "seconds": args.seconds,
        "rounds": args.scaling_rounds, "bundles": bundles,
    }  # fmt: skip
    result = {
        "scenario": "tasks-scaling",
        "title": f"tasks scaling: 1/10/100 tasks, one backbone, uniform mixed load ({dev})",
        "machine": describe(dev),
        "config": config,
        "memory_kind": "device memory taken by start-up"
        if dev == "cuda"
        else "RSS after batches minus before",
        "rows": rows,
        "figure": {
            f"throughput_{last['tasks']}_over_1": last["throughput_ratio"],
            f"rss_{last['tasks']}_over_1": last["rss_ratio"],
            f"engine_memory_{last['tasks']}_over_1": last["engine_memory_ratio"],
        },
        "command": "mtserve bench tasks-scaling " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else []),
        "probes": mem,
    }
    cols = ["bundle", "tasks", "images_per_s", "throughput_ratio", "process_rss_mib", "rss_ratio"]
    cols += ["engine_memory_mib", "engine_memory_ratio", "startup_s", "execution"]
    labels, values = [f"{r['tasks']} tasks" for r in rows], [r["images_per_s"] for r in rows]
    report.write(
        Path(args.out), f"tasks-scaling-{dev}", result, report.table(rows, cols),
        lambda ax: report.bars(ax, labels, values, "images/s"),
    )  # fmt: skip
    return result


def time_calls(engine: OrtEngine, batches: list, seconds: float) -> list[float]:
    """Per-call seconds, cycling through ``batches`` for about ``seconds``."""
    out: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(out) < len(batches):
        for x, t in batches:
            t0 = time.perf_counter()
            engine.infer(x, t)
            out.append(time.perf_counter() - t0)
    return out


def run_mixed_batch(args: argparse.Namespace) -> dict:
    """Mixed-task batch time / fixed-shape batch time, bucketed engine and unbucketed engine."""
    from service.bench import report
    from service.bench.machine import describe

    bundle = args.demo8
    mbs, dev = args.max_batch_size, args.device
    variants = {"as served": (args.batch_buckets, args.cuda_graphs), "no buckets": ("off", "off")}
    rows = []
    for label, (buckets, graphs) in variants.items():
        engine = build_engine(bundle, args.threads, dev, mbs, buckets, graphs)
        try:
            tasks = list(engine.manifest.tasks)
            size = engine.manifest.input.size
            mixed = uniform_batches(tasks, mbs, 16, size, seed=1)
            x0 = mixed[0][0]
            fixed = [(x0, [tasks[0]] * mbs)]
            ms: dict[str, list[float]] = {"mixed": [], "fixed": []}
            for r in range(args.scaling_rounds):  # interleaved: both kinds in every round
                for kind in ("mixed", "fixed") if r % 2 == 0 else ("fixed", "mixed"):
                    calls = time_calls(
                        engine, mixed if kind == "mixed" else fixed, args.seconds / args.scaling_rounds / 2
                    )
                    ms[kind].append(statistics.median(calls) * 1e3)
            mixed_ms, fixed_ms = statistics.median(ms["mixed"]), statistics.median(ms["fixed"])
            rows.append(
                {
                    "engine": label,
                    "execution": engine.describe()["execution"],
                    "batch_size": mbs,
                    "mixed_ms": round(mixed_ms, 3),
                    "fixed_ms": round(fixed_ms, 3),
                    "mixed_over_fixed": round(mixed_ms / fixed_ms, 3),
                    "startup_s": engine.describe().get("startup_s"),
                }
            )
        finally:
            engine.stop()
    result = {
        "scenario": "mixed-batch",
        "title": f"mixed-task batch time / fixed-shape batch time ({dev}, batch {mbs}, {Path(bundle).name})",
        "machine": describe(dev),
        "config": {
            "device": dev,
            "threads": args.threads,
            "bundle": str(bundle),
            "rounds": args.scaling_rounds,
        },
        "rows": rows,
        "figure": {
            "mixed_over_fixed": rows[0]["mixed_over_fixed"],
            "unbucketed": rows[1]["mixed_over_fixed"],
        },
    }
    report.write(Path(args.out), f"mixed-batch-{dev}", result, report.table(rows, list(rows[0])))
    return result


if __name__ == "__main__":
    if "--probe" in sys.argv:
        probe(sys.argv[1:])
