"""The reduced copy of every (segment, variant) file of a bundle: kept fp32, INT8 or FP16, each
written under the work folder and listed (sha256, precision) in a draft manifest."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from contract.bundle import sha256_file
from contract.manifest import Manifest, VariantSpec
from training.quantize_calibration import Reference, calibration_reader, users_of
from training.quantize_fp16 import convert_fp16
from training.quantize_int8 import quantize_int8
from training.quantize_options import QuantizeOptions


def reduce_file(
    ref: Reference,
    index: int,
    segment: str,
    variant: str,
    dst: Path,
    options: QuantizeOptions,
    reduce_range: bool,
) -> tuple[str, str]:
    """Write the reduced ``variant`` of segment ``index`` to ``dst``: its precision and a note on it."""
    src = ref.chain.bundle.path(segment, variant)
    if segment in options.keep_fp32:
        shutil.copy2(src, dst)
        return "fp32", "kept fp32"
    if options.precision == "int8":
        reader = calibration_reader(ref, index, segment, variant, options)
        quantize_int8(src, dst, reader, options, reduce_range)
        users = users_of(ref.chain, segment, variant)
        return "int8", f"calibrated on {reader.rows} images of {', '.join(users)}"
    convert_fp16(src, dst)
    return "fp16", "float16, float32 inputs/outputs"


def reduce_segments(
    ref: Reference, work: Path, options: QuantizeOptions, reduce_range: bool, say: Callable[[str], None]
) -> Manifest:
    """Every file of the source bundle, reduced into ``work``: the draft manifest that lists them."""
    manifest = ref.chain.bundle.manifest
    segments = []
    for index, seg in enumerate(manifest.segments):
        variants = {}
        for vid, spec in seg.variants.items():
            t0 = time.perf_counter()
            dst = work / spec.file
            dst.parent.mkdir(parents=True, exist_ok=True)
            precision, note = reduce_file(ref, index, seg.name, vid, dst, options, reduce_range)
            variants[vid] = VariantSpec(
                file=spec.file, sha256=sha256_file(dst), params=spec.params, precision=precision
            )
            kib = dst.stat().st_size / 1024
            say(f"  {spec.file:40s} {precision}  {kib:9.0f} KiB  {note} ({time.perf_counter() - t0:.1f} s)")
        segments.append(seg.model_copy(update={"variants": variants}))
    return manifest.model_copy(update={"segments": segments})
