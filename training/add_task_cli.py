"""``mtserve add-task BUNDLE --task NAME --data ROOT --out NEW_BUNDLE``: train a new task's own variants
on the frozen shared segments and write a new bundle version (torch is imported only in run())."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="the bundle to extend (needs checkpoint + config.json)")
    parser.add_argument("--task", required=True, help="the new task's name")
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder root with train/ and val/")
    parser.add_argument("--out", type=Path, required=True, help="the new bundle version's folder")
    parser.add_argument("--steps", type=int, help="training steps (default 300)")
    parser.add_argument(
        "--own",
        type=int,
        help="own the first K backbone units (a segment boundary of the plan); default: every "
        "task-specific segment of the plan (the stem for bottom:K), plus the head",
    )
    parser.add_argument(
        "--init",
        choices=["stem", "scratch"],
        help="start the new variants from an existing task's (default, measured better on the demo) "
        "or from timm's initialisation",
    )
    parser.add_argument(
        "--init-from", help="the existing task whose variants start the new ones (default: probed)"
    )
    parser.add_argument("--config", type=Path, help="YAML: steps, optimizer, augment, batch_size, ... ")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default: the bundle's training lr)")
    parser.add_argument("--batch-size", type=int, help="images per step (default 64)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default 1)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default cpu")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--version", help="the new version (default: <old version>+<task>)")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from(args: argparse.Namespace):
    import yaml

    from training.add_task import AddTaskConfig
    from training.config import OptimizerConfig

    data: dict = {}
    if args.config:
        if not args.config.is_file():
            raise FileNotFoundError(f"config file not found: {args.config}")
        data = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{args.config}: expected a mapping at the top level")
        schedule = data.pop("schedule", None) or {}  # mtserve train's spelling: schedule: {steps, ...}
        known = {"steps", "warmup_steps", "min_lr_ratio", "kind"}
        if not isinstance(schedule, dict) or set(schedule) - known:
            raise ValueError(f"{args.config}: schedule takes steps, warmup_steps, min_lr_ratio")
        data = {k: v for k, v in schedule.items() if k != "kind"} | data
    flags = {
        "steps": args.steps,
        "own": args.own,
        "init": args.init,
        "init_from": args.init_from,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "threads": args.threads,
        "device": args.device,
        "seed": args.seed,
    }
    data |= {k: v for k, v in flags.items() if v is not None}
    if args.lr is not None:
        data["optimizer"] = {**(data.get("optimizer") or OptimizerConfig().model_dump()), "lr": args.lr}
    return AddTaskConfig.model_validate(data)


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    from training.add_task import add_task

    result = add_task(
        args.bundle,
        args.task,
        args.data,
        args.out,
        cfg,
        version=args.version,
        progress=not args.no_progress,
    )
    s = result.summary()
    t = s["timings_s"]
    acc = result.manifest.accounting
    top5 = f", top-5 {s['val']['top5']:.4f}" if "top5" in s["val"] else ""
    print(f"{args.task}: val top-1 {s['val']['top1']:.4f}{top5} (best at step {s['best_step']})")
    print(
        f"new files: {', '.join(f'{f} ({n / 1024:.0f} KiB)' for f, n in s['new_files'].items())}; "
        f"{s['unchanged_files']} files byte-identical; other tasks bit-identical: {s['others_bit_identical']}"
    )
    if acc:
        print(
            f"parameters: total {acc.total_params:,}, task-specific {acc.task_specific_params:,} "
            f"({acc.proportion:.1%}); the new task owns {s['trainable_params']:,} "
            f"({s['task_specific_share']:.1%})"
        )
    print(
        f"wall time {t['total_s']:.1f} s (load {t['load_s']:.1f}, probe {t['probe_s']:.1f}, "
        f"train {t['train_s']:.1f}, export {t['export_s']:.1f}) -> {args.out} v{result.manifest.version}"
    )
    print('serve it: POST /admin/reload {"bundle": ...} (sessions of unchanged files are reused)')
    if args.json:
        args.json.write_text(json.dumps(s, indent=2) + "\n")
    return 0
