"""``mtserve inspect BUNDLE``: what a bundle holds, read from its manifest (no torch, no onnxruntime)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from contract.manifest import MANIFEST_FILE, Manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle directory (has manifest.json)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def describe(manifest: Manifest) -> str:
    lines = [
        f"bundle   {manifest.name} v{manifest.version} (created {manifest.created_at})",
        f"backbone {manifest.backbone}   plan {manifest.plan}",
        f"input    {list(manifest.input.size)} mean={list(manifest.input.mean)} "
        f"std={list(manifest.input.std)} {manifest.input.interpolation} crop_pct={manifest.input.crop_pct}",
        "segments",
    ]
    for seg in manifest.segments:
        kind = "shared" if seg.shared else f"{len(seg.variants)} variants"
        params = sum(v.params for v in seg.variants.values())
        parity = manifest.parity.get(seg.name)
        lines.append(
            f"  {seg.name:8s} {kind:12s} params={params:>12,d}  in={list(seg.input_shape)} "
            f"out={list(seg.output_shape)}" + (f"  parity={parity:.1e}" if parity is not None else "")
        )
    lines.append("tasks")
    for task, spec in manifest.tasks.items():
        shown = ", ".join(spec.labels[:6]) + (", ..." if len(spec.labels) > 6 else "")
        lines.append(f"  {task:12s} {len(spec.labels):4d} labels [{shown}]  variants={spec.variants}")
    if acc := manifest.accounting:
        lines.append(
            f"params   total={acc.total_params:,d} task-specific={acc.task_specific_params:,d} "
            f"({100 * acc.proportion:.1f}%)"
        )
        lines.append(
            f"bytes    held={_mb(acc.bytes_held)} vs {len(manifest.tasks)} independent models="
            f"{_mb(acc.bytes_independent)} ({acc.bytes_held / acc.bytes_independent:.2f}x)"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not (args.bundle / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{args.bundle / MANIFEST_FILE} not found: not a bundle directory")
    manifest = Manifest.read(args.bundle)
    print(json.dumps(manifest.model_dump(mode="json"), indent=2) if args.json else describe(manifest))
    return 0
