"""``mtserve export RUN_DIR --out BUNDLE``: a training run -> a verified ONNX bundle."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="training run directory (has config.json + *.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    parser.add_argument("--name", help="bundle name (default: the run directory's name)")
    parser.add_argument("--version", help="bundle version (default: the checkpoint's step)")


def run(args: argparse.Namespace) -> int:
    if not args.run_dir.is_dir():
        raise FileNotFoundError(f"run directory {args.run_dir} does not exist")
    from training.export import export_run

    print(f"exporting {args.run_dir} ({args.checkpoint}) -> {args.out}")
    manifest = export_run(args.run_dir, args.out, which=args.checkpoint, version=args.version, name=args.name)
    worst = max(manifest.parity.values())
    print(
        f"bundle {manifest.name} v{manifest.version}: {len(manifest.segments)} segments, "
        f"{len(manifest.tasks)} tasks, max |onnx - torch| = {worst:.1e} -> {args.out}"
    )
    return 0
