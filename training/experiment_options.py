"""Options every experiment shares (``mtserve experiment paper`` and ``add-task``): how each run goes."""

from __future__ import annotations

import argparse
import json


def add_run_options(p: argparse.ArgumentParser) -> None:
    """How every run of an experiment goes: data caps, threads, workers, device (also add-task's)."""
    p.add_argument("--max-train-per-class", type=int, help="cap train images per class (symlinked subset)")
    p.add_argument("--max-val-per-class", type=int, help="cap val images per class")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")


def with_run_settings(own: dict, args: argparse.Namespace, quick: dict) -> dict:
    """The settings every run shares (model, steps, optimizer, :func:`add_run_options`) plus the
    experiment's ``own``; ``quick`` over them all with ``--quick``; the warmup (a twentieth of the steps)."""
    s = {
        "backbone": args.backbone,
        "timm_kwargs": json.loads(args.timm_kwargs) if args.timm_kwargs else {},
        "input_size": args.input_size,
        "steps": args.steps,
        "batch_per_task": args.batch_per_task,
        "lr": args.lr,
        "weight_decay": 0.05,
        **own,
        "max_train_per_class": args.max_train_per_class,
        "max_val_per_class": args.max_val_per_class,
        "threads": args.threads,
        "workers": args.workers,
        "device": args.device,
        "quick": args.quick,
    }
    if args.quick:
        s |= quick
    s["warmup_steps"] = min(max(s["steps"] // 20, 1), s["steps"] - 1)
    return s
