"""What ``mtserve quantize`` can be asked (docs/precision.md): the options, their choices, their checks.

Light on purpose (no numpy, no onnxruntime): the CLI takes its choices and defaults from here when
``mtserve`` starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contract.errors import UserError

PRECISIONS = ("int8", "fp16")
CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("uint8", "int8")


@dataclass(frozen=True)
class QuantizeOptions:
    precision: str = "int8"
    max_accuracy_drop: float = 1.0  # points of top-1, per task
    calibration_images: int = 128  # per (segment, variant), from the train split
    calibrate_method: str = "minmax"
    per_channel: bool = True
    reduce_range: bool | None = None  # None: on where the CPU lacks VNNI / AMX
    activation_type: str = "uint8"  # uint8 (x86, onnxruntime's advice) or int8 (ARM, GPU/TensorRT)
    keep_fp32: tuple[str, ...] = ()  # segments left in fp32
    max_eval_images: int | None = None  # per task, from the val split (None: all of it)
    batch_size: int = 64
    threads: int | None = None
    seed: int = 0


def check_options(options: QuantizeOptions, out: Path) -> None:
    """Raise :class:`UserError` (one line) for options out of range or an ``out`` that is not empty."""
    if options.precision not in PRECISIONS:
        raise UserError(f"--precision {options.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if options.calibrate_method not in CALIBRATE_METHODS:
        raise UserError(
            f"--calibrate-method {options.calibrate_method!r}: one of {', '.join(CALIBRATE_METHODS)}"
        )
    if options.max_accuracy_drop < 0:
        raise UserError(f"--max-accuracy-drop {options.max_accuracy_drop:g}: must be >= 0 (points of top-1)")
    if options.calibration_images < 1:
        raise UserError("--calibration-images must be >= 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty; choose a new folder or remove it")
