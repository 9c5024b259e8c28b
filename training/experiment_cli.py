"""``mtserve experiment paper``: the paper's plan comparison (torch is imported only in run())."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from training.experiment_options import add_run_options, with_run_settings

QUICK = {
    "steps": 3,
    "seeds": [0],
    "max_train_per_class": 8,
    "max_val_per_class": 4,
    "batch_per_task": 4,
    "workers": 0,
    "curve_points": 1,
}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    """Issue 15: small-budget pairs, the BN ablation, the number of tasks, the validation curve."""
    p.add_argument(
        "--small-levels",
        type=_floats,
        default=[0.05, 0.20],
        help="small-budget matched pairs: bottom:K' closest to each level vs head:H (shared body, per-task "
        "head with a hidden layer) at that bottom's share (default 0.05,0.20; '' for none)",
    )
    p.add_argument(
        "--no-bn-ablation",
        dest="bn_ablation",
        action="store_false",
        help="leave out the shared+bn plan (all weights shared, BatchNorm per task)",
    )
    p.add_argument(
        "--task-counts",
        type=_ints,
        default=[],
        help="also run the first N task folders (name order) of --data as their own data sets, e.g. 3,5",
    )
    p.add_argument(
        "--task-counts-only",
        action="store_true",
        help="run only the --task-counts subsets, not the whole --data (its runs are another --out's)",
    )
    p.add_argument(
        "--curve-points",
        type=int,
        default=5,
        help="validations per run, for the curve and resuming inside a run (default 5; the result is the "
        "last step's)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    p = sub.add_parser("paper", help="shared / top:K / bottom:K' / independent at equal task-specific share")
    p.add_argument("--data", type=Path, required=True, help="multi-domain data root (mtserve data mdb)")
    p.add_argument("--control-data", type=Path, help="control root: one domain, labels differ (mdb-control)")
    p.add_argument("--out", type=Path, required=True, help="results folder: results.json, table.md, plot.png")
    p.add_argument(
        "--quick",
        action="store_true",
        help="seconds: 3 steps, 1 seed, 8 train / 4 val images per class, no workers",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per plan (default 3)")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    p.add_argument("--batch-per-task", type=int, default=16, help="images per task per step (default 16)")
    p.add_argument("--lr", type=float, default=0.002, help="AdamW learning rate (default 0.002)")
    p.add_argument("--backbone", default="resnet34", help="timm backbone (default resnet34)")
    p.add_argument(
        "--timm-kwargs",
        default='{"channels": [16, 32, 64, 128]}',
        help="JSON timm.create_model kwargs (default: quarter-width ResNet)",
    )
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument(
        "--levels",
        type=_floats,
        help="matched top/bottom levels, e.g. 0.66,0.85 "
        "(default: the two smallest proportions top:K can reach)",
    )
    p.add_argument(
        "--bottom-levels",
        type=_floats,
        default=[0.05, 0.25],
        help="extra bottom:K levels that no top:K reaches (default 0.05,0.25)",
    )
    _add_plan_options(p)
    add_run_options(p)
    p.add_argument(
        "--work", type=Path, help="run directories and data subsets (default runs/experiment-<out>)"
    )
    p.add_argument(
        "--fresh", action="store_true", help="replace an existing results.json instead of resuming"
    )
    p.add_argument(
        "--report-only", action="store_true", help="rewrite table.md and plot.png from results.json"
    )
    from training import add_task_experiment  # issue 14; no torch at import

    help_add = "leave-one-out: a domain added to a trunk trained without it vs joint vs independent"
    add_task_experiment.add_arguments(sub.add_parser("add-task", help=help_add, description=help_add))


def settings_from(args: argparse.Namespace) -> dict:
    """The settings every run shares; a resumed experiment must match them exactly."""
    s = {
        "seeds": list(range(args.seeds)),
        "levels": args.levels,
        "bottom_levels": args.bottom_levels,
        "small_levels": args.small_levels,
        "bn_ablation": args.bn_ablation,
        "task_counts": args.task_counts,
        "curve_points": args.curve_points,
    }
    s = with_run_settings(s, args, QUICK)
    s["work_dir"] = str(args.work or Path("runs") / f"experiment-{args.out.name}")
    return s


def command_line(args: argparse.Namespace) -> str:
    """The invocation spelled out with every option, so it reproduces the run exactly."""
    parts = ["mtserve", "experiment", "paper", "--data", str(args.data), "--out", str(args.out)]
    if args.control_data:
        parts += ["--control-data", str(args.control_data)]
    for flag in (
        "seeds",
        "steps",
        "batch_per_task",
        "lr",
        "backbone",
        "timm_kwargs",
        "input_size",
        "levels",
        "bottom_levels",
        "small_levels",
        "task_counts",
        "curve_points",
        "max_train_per_class",
        "max_val_per_class",
        "threads",
        "workers",
        "device",
        "work",
    ):
        value = getattr(args, flag)
        if value is not None:
            value = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            parts += ["--" + flag.replace("_", "-"), value]
    flags = ["--no-bn-ablation"] if not args.bn_ablation else []
    flags += ["--task-counts-only"] if args.task_counts_only else []
    flags += ["--quick"] if args.quick else []
    return shlex.join(parts + flags)


def run(args: argparse.Namespace) -> int:
    if args.experiment == "add-task":
        from training.add_task_experiment import run as run_add_task

        return run_add_task(args)
    from training.experiment_report import write_report

    out: Path = args.out
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
        for path in write_report(results, out):
            print(f"wrote {path}")
        return 0
    from training.experiment import run_experiment, task_subsets

    settings = settings_from(args)
    subsets = task_subsets(args.data, args.task_counts, Path(settings["work_dir"]))
    if args.task_counts_only and not subsets:
        raise SystemExit("--task-counts-only: no --task-counts below the number of task folders of --data")
    datasets = {} if args.task_counts_only else {"mdb": args.data}
    datasets |= {f"mdb-{k}": v for k, v in subsets.items()}
    datasets |= {"control": args.control_data} if args.control_data else {}
    start = time.perf_counter()
    command = command_line(args)
    results = run_experiment(
        datasets,
        out,
        settings,
        fresh=args.fresh,
        command=command,
        say=lambda m: print(m, file=sys.stderr, flush=True),
    )
    results.data["wall_s_last_invocation"] = time.perf_counter() - start
    results.save()
    table, plot = write_report(results.data, out)
    print(table.read_text())
    print(f"wrote {out / 'results.json'}, {table}, {plot} in {time.perf_counter() - start:.0f} s")
    return 0
