"""Scenario ``precision``: engine images/s of a reduced-precision bundle against its fp32 source.

INT8 vs FP32 on the CPU for the demo and resnet50@224 (batch 1 and 32), FP16 vs FP32 on a GPU
(``--device cuda``; otherwise reported as not measured). Both engines (``service.engine.OrtEngine``,
the server's own runner, no HTTP) are loaded side by side and timed interleaved, A B A B ..., so a
machine shared with other jobs slows both alike: each round gives a ratio, the report gives their
median and range, the load average before and after, and the CPU flags that decide INT8 speed
(avx2, avx512_vnni, avx_vnni, amx). The int8 manifests' measured accuracies go beside the speeds.

Build the bundles first (docs/precision.md): ``mtserve quantize bundles/demo --out bundles/demo-int8``
and ``python -m training.quantize_bench`` (resnet50 2 tasks, random weights, and its int8 copy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from contract.bundle import load_bundle
from contract.host import cpu_flags
from service.bench.machine import describe
from service.precision import CUDA, int8_flags

BATCHES = (1, 32)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The precision scenario's own options (on `mtserve bench`)."""
    g = p.add_argument_group("precision scenario")
    g.add_argument("--demo-int8", default="bundles/demo-int8", help="int8 copy of --demo")
    g.add_argument("--demo-fp16", default="bundles/demo-fp16", help="fp16 copy of --demo (GPU only)")
    g.add_argument("--r50-mt2", default="bundles/bench/r50-mt2", help="resnet50@224 bottom:1, 2 tasks")
    g.add_argument("--r50-mt2-int8", default="bundles/bench/r50-mt2-int8", help="int8 copy of --r50-mt2")
    g.add_argument("--r50-mt2-fp16", default="bundles/bench/r50-mt2-fp16", help="fp16 copy (GPU only)")
    g.add_argument("--rounds", type=int, default=3, help="A/B rounds per batch size (default 3)")


def _ips(engine, tasks, batch: int, seconds: float) -> tuple[float, float]:
    """(images/s of wall time, images/s of this process's CPU time): the second is less moved by
    other jobs taking the cores, though not by their use of caches and memory bandwidth."""
    from service.bench.engine_bench import time_batches

    cpu0 = time.process_time()
    ips, calls = time_batches(engine, tasks, batch, seconds)
    cpu = time.process_time() - cpu0
    return ips, batch * (len(calls) + 1) / cpu  # time_batches runs one untimed call first


def compare(
    base: Path, other: Path, threads: int, seconds: float, rounds: int, device: str = "cpu"
) -> list[dict]:
    """Per batch size: images/s of each bundle (median over rounds) and their ratio, interleaved."""
    from service.bench.engine_bench import make_engine

    a, b = make_engine(base, threads, device), make_engine(other, threads, device)
    try:
        if device == "cuda" and CUDA not in b.providers:
            raise RuntimeError(f"{other}: runs on {b.providers}, not on CUDA")
        tasks = list(a.manifest.tasks)
        rows = []
        for batch in BATCHES:
            load0 = os.getloadavg()[0]
            ips_a, ips_b, cpu_a, cpu_b = [], [], [], []
            for _ in range(rounds):
                for ips, cpu, engine in ((ips_a, cpu_a, a), (ips_b, cpu_b, b)):
                    wall_ips, cpu_ips = _ips(engine, tasks, batch, seconds)
                    ips.append(wall_ips)
                    cpu.append(cpu_ips)
            ratios = [y / x for x, y in zip(ips_a, ips_b, strict=True)]
            cpu_ratios = [y / x for x, y in zip(cpu_a, cpu_b, strict=True)]
            rows.append(
                {
                    "batch_size": batch,
                    "base_images_per_s": round(statistics.median(ips_a), 1),
                    "reduced_images_per_s": round(statistics.median(ips_b), 1),
                    "speedup": round(statistics.median(ratios), 3),
                    "speedup_min": round(min(ratios), 3),
                    "speedup_max": round(max(ratios), 3),
                    "base_images_per_cpu_s": round(statistics.median(cpu_a), 1),
                    "reduced_images_per_cpu_s": round(statistics.median(cpu_b), 1),
                    "cpu_speedup": round(statistics.median(cpu_ratios), 3),
                    "cpu_speedup_min": round(min(cpu_ratios), 3),
                    "cpu_speedup_max": round(max(cpu_ratios), 3),
                    "rounds": rounds,
                    "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
                }
            )
        return rows
    finally:
        a.stop()
        b.stop()


def _accuracy(bundle: Path) -> dict:
    report = load_bundle(bundle, verify_sha256=False).manifest.reduced_precision
    if report is None:
        return {}
    return {
        t: {
            "top1_fp32": a.top1_fp32,
            "top1_reduced": a.top1_reduced,
            "drop": a.drop,
            "agreement": a.agreement,
        }
        for t, a in report.tasks.items()
    }


def run_precision(args: argparse.Namespace) -> dict:
    """Measure every pair whose bundles exist; write ``precision.json`` / ``precision.md`` in --out."""
    from service.bench import report

    seconds = args.seconds / 3 if not args.quick else 0.2
    rounds = 1 if args.quick else args.rounds
    flags = cpu_flags()
    result: dict = {
        "scenario": "precision",
        "title": "precision: engine images/s, reduced vs fp32 (interleaved A/B rounds)",
        "machine": describe(args.device),
        "cpu_flags": int8_flags(flags),
        "config": {"threads": args.threads, "seconds_per_point": seconds, "rounds": rounds},
        "int8": {},
        "fp16": {},
    }
    pairs = {
        "demo": (args.demo, args.demo_int8, args.demo_fp16),
        "r50": (args.r50_mt2, args.r50_mt2_int8, args.r50_mt2_fp16),
    }
    for key, (fp32, int8, fp16) in pairs.items():
        if not (Path(fp32) / "manifest.json").exists() or not (Path(int8) / "manifest.json").exists():
            result["int8"][key] = {"not_measured": f"{fp32} or {int8} missing (docs/precision.md)"}
            print(f"precision {key}: skip, {fp32} or {int8} missing")
        else:
            print(f"precision int8 {key} ...", flush=True)
            rows = compare(Path(fp32), Path(int8), args.threads, seconds, rounds, "cpu")
            result["int8"][key] = {"bundles": [fp32, int8], "rows": rows, "accuracy": _accuracy(Path(int8))}
            print(
                f"precision int8 {key}: " + ", ".join(f"bs {r['batch_size']} x{r['speedup']}" for r in rows)
            )
        if args.device != "cuda":
            result["fp16"][key] = {"not_measured": "no GPU (FP16 runs on CUDA only; run with --device cuda)"}
        elif not (Path(fp32) / "manifest.json").exists() or not (Path(fp16) / "manifest.json").exists():
            result["fp16"][key] = {
                "not_measured": f"{fp32} or {fp16} missing (mtserve quantize --precision fp16)"
            }
        else:
            rows = compare(Path(fp32), Path(fp16), args.threads, seconds, rounds, "cuda")
            result["fp16"][key] = {"bundles": [fp32, fp16], "rows": rows, "accuracy": _accuracy(Path(fp16))}
    report.write(Path(args.out), "precision", result, markdown(result))
    return result


def markdown(result: dict) -> str:
    f = result["cpu_flags"]
    lines = [
        "CPU flags: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in f.items()) + "\n",
        "| precision | model | batch | fp32 images/s | reduced images/s "
        "| speed-up (median, min-max of rounds) | CPU-time speed-up | load avg 1 min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for precision in ("int8", "fp16"):
        for key, entry in result[precision].items():
            if "rows" not in entry:
                lines.append(f"| {precision} | {key} | | | | not measured: {entry['not_measured']} | | |")
                continue
            for r in entry["rows"]:
                lines.append(
                    f"| {precision} | {key} | {r['batch_size']} | {r['base_images_per_s']} | "
                    f"{r['reduced_images_per_s']} | {r['speedup']:.2f}x ({r['speedup_min']:.2f}-"
                    f"{r['speedup_max']:.2f}) | {r['cpu_speedup']:.2f}x ({r['cpu_speedup_min']:.2f}-"
                    f"{r['cpu_speedup_max']:.2f}) | {r['loadavg_1m'][0]} -> {r['loadavg_1m'][1]} |"
                )
    lines += ["", "| precision | model | task | top-1 fp32 | top-1 reduced | drop (points) | agreement |"]
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for precision in ("int8", "fp16"):
        for key, entry in result[precision].items():
            for task, a in entry.get("accuracy", {}).items():
                lines.append(
                    f"| {precision} | {key} | {task} | {a['top1_fp32']:.2f}% | {a['top1_reduced']:.2f}% | "
                    f"{a['drop']:+.2f} | {a['agreement']:.2f}% |"
                )
    return "\n".join(lines) + "\n"
