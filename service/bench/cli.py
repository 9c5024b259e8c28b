"""``mtserve bench SCENARIO``: engine, overhead (P1), cross-task (P2), memory (P3), peer (P4), idle (P5), all.

Each scenario writes ``NAME.json`` (with the machine), ``NAME.md`` and ``NAME.png`` into ``--out``;
``all`` adds ``summary.json`` / ``summary.md`` with every target. Build the bundles first:
``python scripts/make_bench_bundles.py`` (resnet50 ones), the demo bundle per docs/trainer.md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from contract.host import available_cpus
from service.bench import api_cpu as api_cpu_scenario
from service.bench import precision as precision_scenario
from service.bench import tasks_scaling as scaling_scenario
from service.bench import workers as workers_scenario
from service.bench import wrk
from service.bench.context import BenchContext, BenchModel

SCENARIOS = ("engine", "overhead", "cross-task", "memory", "peer", "idle")
# scenarios with bundles or servers of their own, run one at a time
OWN_BUNDLES = ("precision", "tasks-scaling", "mixed-batch", "api-cpu", "workers")
# scenario -> models it runs on by default in `all` (P3 needs independent bundles: resnet50 only)
DEFAULT_MODELS = {
    "engine": "demo,r50",
    "overhead": "demo,r50",
    "cross-task": "demo,r50",
    "memory": "r50",
    "peer": "demo",
    "idle": "demo,r50",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "scenario",
        choices=[*SCENARIOS, "all", "summary", *OWN_BUNDLES],
        help="summary: rebuild summary.md from --out",
    )
    p.add_argument("--out", default="results/bench", help="output folder (default results/bench)")
    p.add_argument("--models", help="comma list of demo,r50 (default: per scenario, see docs/bench.md)")
    p.add_argument("--demo", default="bundles/demo", help="the demo bundle (engine, P1, P4, P5)")
    p.add_argument("--demo8", default="bundles/bench/demo8", help="demo architecture with 8 tasks (P2)")
    p.add_argument("--r50", default="bundles/bench/r50-mt16", help="resnet50@224 bottom:1, 16 tasks")
    p.add_argument("--r50-singles", default="bundles/bench/r50-single", help="folder of single-task bundles")
    p.add_argument("--threads", type=int, default=available_cpus(), help="onnxruntime threads, both sides")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="engine, servers")
    p.add_argument("--seconds", type=float, default=5.0, help="per load point (resnet50: x1.6)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--r50-max-batch-size", type=int, default=8, help="max batch size for resnet50")
    p.add_argument("--p99-demo-ms", type=float, default=100.0, help="p99 target of the demo model")
    p.add_argument("--p99-r50-ms", type=float, default=2000.0, help="p99 target of resnet50")
    p.add_argument("--quick", action="store_true", help="smoke run: short points, few rates (no figures)")
    p.add_argument(
        "--loadgen",
        choices=wrk.TOOLS,
        default="auto",
        help="closed-loop saturation load (overhead, api-cpu, workers): auto = wrk, else hey (one body "
        "only), else the Python generator; open-loop scenarios always use the Python one (docs/bench.md)",
    )
    p.add_argument(
        "--service-workers",
        default="auto",
        help="overhead (P1), idle (P5): the server's --workers values, each served in the same run "
        "(e.g. 0,1; default auto: the server's default); the figure of the first one is P1/P5, the others "
        "get a _wN suffix",
    )
    p.add_argument(
        "--saturation",
        default="2,4",
        help="overhead (P1): clients in flight, as multiples of the max batch size, each run in turn; "
        "the service's saturation is the highest throughput among them (default 2,4: a front that "
        "takes time needs more than two batches in flight to keep the engine busy)",
    )
    precision_scenario.add_arguments(p)
    api_cpu_scenario.add_arguments(p)
    workers_scenario.add_arguments(p)
    scaling_scenario.add_arguments(p)


def models(args: argparse.Namespace) -> dict[str, BenchModel]:
    singles = sorted(p for p in Path(args.r50_singles).glob("*") if (p / "manifest.json").exists())
    return {
        "demo": BenchModel("demo", Path(args.demo), Path(args.demo8), args.p99_demo_ms),
        "r50": BenchModel(
            "r50", Path(args.r50), Path(args.r50), args.p99_r50_ms, warmup_s=3.0, singles=singles
        ),
    }


def contexts(args: argparse.Namespace) -> dict[str, BenchContext]:
    base = BenchContext(Path(args.out), args.threads, args.seconds, args.max_batch_size, args.max_wait_ms)
    workers = tuple(w.strip() for w in args.service_workers.split(",") if w.strip())
    saturation = tuple(int(k) for k in args.saturation.split(",") if k.strip())
    base = replace(base, device=args.device, loadgen=args.loadgen, service_workers=workers or ("auto",))
    base = replace(base, saturation=saturation or (2,))
    if args.quick:
        base = replace(base, seconds=0.3, rates=(0.5, 1.0), mixes=("uniform",), quick=True, saturation=(2,))
        return {"demo": base, "r50": base}  # models' warm-up shortened in run()
    # resnet50: compute-bound, so batch 8 runs as fast per image as 32 (and warms up 4x sooner)
    r50 = replace(
        base,
        seconds=args.seconds * 1.6,
        rates=(0.4, 0.7, 1.0, 1.3),
        mixes=("uniform",),
        max_batch_size=args.r50_max_batch_size,
    )
    return {"demo": base, "r50": r50}


def run_one(name: str, ctx: BenchContext, model: BenchModel) -> dict:
    from service.bench import http_scenarios as h
    from service.bench.engine_bench import run_engine
    from service.bench.memory import memory
    from service.bench.peer import peer

    if name == "engine":
        return engine_scenario(ctx, model, run_engine)
    fn = {"overhead": h.overhead, "cross-task": h.cross_task, "idle": h.idle, "memory": memory, "peer": peer}
    return fn[name](ctx, model)


def engine_scenario(ctx: BenchContext, model: BenchModel, run_engine) -> dict:
    from service.bench import report

    result = ctx.header("engine", model, f"engine: raw onnxruntime images/s ({model.key})")
    result |= run_engine(model.bundle, ctx.threads, (1, 2, 4, 8, 16, 32), ctx.seconds / 3, device=ctx.device)
    rows = result["rows"]
    report.write(
        ctx.out,
        f"engine-{model.key}",
        result,
        report.table(rows, list(rows[0])),
        lambda ax: report.bars(
            ax, [f"bs {r['batch_size']}" for r in rows], [r["images_per_s"] for r in rows], "images/s"
        ),
    )
    return result


def run(args: argparse.Namespace) -> int:
    if args.scenario == "precision":  # pairs of bundles of its own (docs/precision.md)
        precision_scenario.run_precision(args)
        return 0
    if args.scenario in ("api-cpu", "workers"):  # the front's cost and scaling (issue 12)
        fn = api_cpu_scenario.run_api_cpu if args.scenario == "api-cpu" else workers_scenario.run_workers
        print(json.dumps(fn(args)["figure"]))
        return 0
    if args.scenario in ("tasks-scaling", "mixed-batch"):  # bundles of their own (issue 13)
        scenario_fn = {
            "tasks-scaling": scaling_scenario.run_tasks_scaling,
            "mixed-batch": scaling_scenario.run_mixed_batch,
        }
        print(json.dumps(scenario_fn[args.scenario](args)["figure"]))
        return 0
    if args.scenario == "summary":
        from service.bench.summary import write_summary

        out = Path(args.out)
        found = {f.stem: json.loads(f.read_text()) for f in out.glob("*-*.json")}
        write_summary(out, found, float("nan"))
        print((out / "summary.md").read_text())
        return 0
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    if "overhead" in names:
        wrk.pick(args.loadgen, one_body=False)  # a missing or unfit --loadgen fails now, not mid-run
    ms, ctxs = models(args), contexts(args)
    results: dict[str, dict] = {}
    t0 = time.monotonic()
    for name in names:
        for key in (args.models or DEFAULT_MODELS[name]).split(","):
            model = ms[key]
            if args.quick and key == "r50" and name != "memory":
                continue  # smoke run: the second model only where it is the only one
            if not model.bundle.exists():
                print(f"skip {name} {key}: {model.bundle} missing")
                continue
            if name == "memory" and not model.singles:
                print(f"skip memory {key}: no single-task bundles under {args.r50_singles}")
                continue
            if args.quick:
                model = replace(model, warmup_s=0.1)
            t = time.monotonic()
            print(f"{name} {key} ...", flush=True)
            res = run_one(name, ctxs[key], model)
            results[f"{name}-{key}"] = res
            print(
                f"{name} {key}: {json.dumps(res.get('figure', {}))} ({time.monotonic() - t:.0f} s)",
                flush=True,
            )
    if args.scenario == "all":
        from service.bench.summary import write_summary

        write_summary(Path(args.out), results, time.monotonic() - t0)
    return 0
