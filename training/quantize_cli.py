"""``mtserve quantize BUNDLE --out NEW --precision int8|fp16``: a reduced-precision copy of an fp32
bundle, calibrated per segment variant and accuracy-checked per task (docs/precision.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from training.quantize_options import ACTIVATION_TYPES, CALIBRATE_METHODS, PRECISIONS, QuantizeOptions

DEFAULTS = QuantizeOptions()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="the fp32 bundle (as `mtserve export` writes it)")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULTS.precision,
        help="int8: onnxruntime static quantization, QDQ, for the CPU (default); fp16: for CUDA",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="TASK=ROOT|ROOT",
        help="ImageFolder root (train/ + val/) of a task, or a folder with one per task; repeatable. "
        "Default: the data of the run the bundle was exported from (its config.json)",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=DEFAULTS.max_accuracy_drop,
        help="refuse the bundle if any task loses more top-1 points than this on its val split "
        f"(default {DEFAULTS.max_accuracy_drop:g})",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=DEFAULTS.calibration_images,
        help=f"train images per segment variant (default {DEFAULTS.calibration_images})",
    )
    parser.add_argument("--calibrate-method", choices=CALIBRATE_METHODS, default=DEFAULTS.calibrate_method)
    parser.add_argument(
        "--per-channel",
        action=argparse.BooleanOptionalAction,
        default=DEFAULTS.per_channel,
        help="per-channel int8 weights (default on)",
    )
    parser.add_argument(
        "--reduce-range",
        choices=("auto", "on", "off"),
        default="auto",
        help="7-bit weights; auto: on where the CPU lacks VNNI/AMX (onnxruntime's advice)",
    )
    parser.add_argument(
        "--activation-type",
        choices=ACTIVATION_TYPES,
        default=DEFAULTS.activation_type,
        help="uint8 for x86 CPUs (default), int8 for ARM or TensorRT",
    )
    parser.add_argument(
        "--keep-fp32", action="append", default=[], metavar="SEGMENT", help="leave this segment in fp32"
    )
    parser.add_argument("--max-eval-images", type=int, help="val images per task for the check (default all)")
    parser.add_argument("--threads", type=int, help="onnxruntime threads (default: the usable cores)")


def run(args: argparse.Namespace) -> int:
    from training.quantize import quantize_bundle

    options = QuantizeOptions(
        precision=args.precision,
        max_accuracy_drop=args.max_accuracy_drop,
        calibration_images=args.calibration_images,
        calibrate_method=args.calibrate_method,
        per_channel=args.per_channel,
        reduce_range={"auto": None, "on": True, "off": False}[args.reduce_range],
        activation_type=args.activation_type,
        keep_fp32=tuple(args.keep_fp32),
        max_eval_images=args.max_eval_images,
        threads=args.threads,
    )
    print(f"{args.precision}: {args.bundle} -> {args.out}")
    manifest = quantize_bundle(args.bundle, args.out, options, data=args.data)
    report = manifest.reduced_precision
    worst = max(a.drop for a in report.tasks.values())
    print(
        f"bundle {manifest.name} v{manifest.version}: {len(report.tasks)} tasks, worst top-1 drop "
        f"{worst:+.2f} points (limit {report.max_accuracy_drop:g}) -> {args.out}"
    )
    return 0
