"""Reduced-precision bundles (docs/precision.md): an fp32 bundle -> int8 (CPU) or fp16 (GPU).

INT8 is onnxruntime's static quantization (``quantize_static``: QDQ format, per-channel int8
weights, uint8 activations on x86, ``reduce_range`` where the CPU lacks VNNI/AMX, as its
docstring advises), after its ``quant_pre_process``. Each (segment, variant) file is calibrated on
what it sees in serving: images of the tasks that use it (a task's stem on that task's images, a
shared trunk on a mix of all its tasks), fed through the fp32 segments before it. FP16 is
onnxruntime's float16 converter (the one onnxconverter-common ships, bundled with onnxruntime as
``onnxruntime.transformers.float16``) with float32 inputs and outputs kept.

Then every task's validation images run through the fp32 bundle and the reduced one: top-1 of
each and their top-1 agreement go into the manifest, and a task that loses more than
``max_accuracy_drop`` points refuses the whole bundle (nothing is written).

This module runs the steps; each lives in its own:

- :mod:`training.quantize_options`     the options, their choices and checks
- :mod:`training.quantize_data`        each task's data root, calibration and val samples, transform
- :mod:`training.quantize_chain`       onnxruntime sessions run along one task's path
- :mod:`training.quantize_calibration` per-variant calibration inputs (the reader onnxruntime pulls)
- :mod:`training.quantize_int8`        INT8 of one file;  :mod:`training.quantize_fp16` FP16 of one
- :mod:`training.quantize_segments`    every (segment, variant) file reduced, the draft manifest
- :mod:`training.quantize_accuracy`    the accuracy check against the fp32 bundle
- :mod:`training.quantize_write`       the ``reduced_precision`` report, the new bundle + manifest
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from contract.bundle import Bundle, load_bundle
from contract.errors import UserError
from contract.host import available_cpus, has_vnni
from contract.manifest import Manifest
from training.quantize_accuracy import check_accuracy, say_accuracy
from training.quantize_accuracy import evaluate as _evaluate  # tests replace it here
from training.quantize_calibration import Reference
from training.quantize_chain import OrtChain
from training.quantize_data import CONFIG, eval_transform, load_tasks, resolve_data
from training.quantize_fp16 import fp16_providers
from training.quantize_options import QuantizeOptions, check_options
from training.quantize_segments import reduce_segments
from training.quantize_write import method_record, reduced_report, work_folder, write_bundle

__all__ = ["CONFIG", "QuantizeOptions", "check_accuracy", "quantize_bundle", "resolve_data"]

log = logging.getLogger("mtserve.quantize")


def _open_source(src: Path, out: Path, options: QuantizeOptions) -> Bundle:
    """The fp32 bundle ``src``, once the options, ``out`` and ``--keep-fp32`` check out."""
    check_options(options, out)
    bundle = load_bundle(src)
    manifest = bundle.manifest
    if manifest.precisions != {"fp32"}:
        raise UserError(
            f"{src} is already reduced ({', '.join(sorted(manifest.precisions))}): quantize its fp32 source"
        )
    unknown = [s for s in options.keep_fp32 if s not in {seg.name for seg in manifest.segments}]
    if unknown:
        raise UserError(
            f"--keep-fp32 {unknown}: the bundle's segments are {[s.name for s in manifest.segments]}"
        )
    return bundle


def quantize_bundle(
    src: str | Path,
    out: str | Path,
    options: QuantizeOptions = QuantizeOptions(),
    data: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> Manifest:
    """Write the reduced-precision bundle of the fp32 bundle ``src`` into ``out`` (absent or empty).

    Raises :class:`UserError` for bad arguments and for an accuracy drop over the limit (then
    ``out`` is left as it was).
    """
    src, out = Path(src), Path(out)
    bundle = _open_source(src, out, options)
    manifest = bundle.manifest
    vnni = has_vnni()
    reduce_range = (not vnni) if options.reduce_range is None else options.reduce_range
    threads = options.threads or available_cpus()
    tasks = load_tasks(manifest, resolve_data(src, manifest, data), options)
    ref = Reference(OrtChain(bundle, threads), tasks, eval_transform(manifest))

    work = work_folder(out)
    try:
        draft = reduce_segments(ref, work, options, reduce_range, say)
        providers = fp16_providers() if options.precision == "fp16" else ["CPUExecutionProvider"]
        new = OrtChain(Bundle(work, draft), threads, providers)
        accuracy, diff = _evaluate(ref.chain, new, tasks, options.batch_size, ref.tf)
        method = method_record(options, reduce_range, vnni)
        report = reduced_report(src, manifest, options, method, new.provider, accuracy, diff)
        say_accuracy(options.precision, accuracy, say)
        check_accuracy(options.precision, accuracy, options.max_accuracy_drop)
        return write_bundle(src, work, out, draft, report)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
