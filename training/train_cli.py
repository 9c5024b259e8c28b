"""``mtserve train``: train a multi-task model from a YAML config (torch is imported only in run())."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML training config (see docs/trainer.md)")
    parser.add_argument("--out", help="run directory (default: the config's output_dir, else runs/<config>)")
    parser.add_argument("--max-steps", type=int, help="stop after this step (the schedule is unchanged)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in the run dir")
    parser.add_argument(
        "--pretrained",
        help="timm pretrained weights: 'true' (the backbone's default tag), hf-hub:ORG/NAME, or a local "
        ".safetensors/.pth file (overrides the config's pretrained)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the config's device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from training.config import load_config

    cfg = load_config(args.config)
    if args.device:
        cfg = cfg.model_copy(update={"device": args.device})
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, not {args.max_steps}")
    run_dir = Path(args.out or cfg.output_dir or Path("runs") / Path(args.config).stem)

    from training.trainer import train

    result = train(
        cfg,
        run_dir,
        max_steps=args.max_steps,
        resume=args.resume,
        pretrained=args.pretrained,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"step {result.step} in {result.wall_s:.1f} s, {result.images_per_s:.0f} images/s (training)")
    for task, acc in result.val.items():
        top5 = f", top-5 {acc['top5']:.4f}" if "top5" in acc else ""
        print(f"  {task}: val top-1 {acc['top1']:.4f}{top5}")
    if result.best:
        print(f"best mean val top-1 {result.best['mean_top1']:.4f} at step {result.best['step']}")
    if result.skipped:
        print(f"warning: skipped unreadable training images: {result.skipped}")
    print(f"run written to {result.run_dir} (best.safetensors, last.safetensors, config.json, metrics.csv)")
    return 0
