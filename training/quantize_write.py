"""Writing the reduced bundle: the manifest's ``reduced_precision`` report, the final manifest, and
the move of the finished work folder into place (``out`` appears whole or not at all)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from contract.bundle import load_bundle, sha256_file
from contract.manifest import MANIFEST_FILE, Manifest, ReducedPrecision, TaskAccuracy
from training.quantize_data import CONFIG
from training.quantize_fp16 import FP16_METHOD
from training.quantize_int8 import int8_method
from training.quantize_options import QuantizeOptions


def method_record(options: QuantizeOptions, reduce_range: bool, vnni: bool) -> dict:
    """The manifest's ``reduced_precision.method``: the tool, how the files were made, what was kept."""
    import onnxruntime as ort

    method: dict = {"tool": "onnxruntime " + ort.__version__}
    method |= int8_method(options, reduce_range, vnni) if options.precision == "int8" else FP16_METHOD
    if options.keep_fp32:
        method["keep_fp32"] = list(options.keep_fp32)
    return method


def reduced_report(
    src: Path,
    source: Manifest,
    options: QuantizeOptions,
    method: dict,
    eval_provider: str,
    accuracy: Mapping[str, TaskAccuracy],
    diff: Mapping[str, float],
) -> ReducedPrecision:
    """The manifest's ``reduced_precision``: the source bundle, the method and the accuracy check."""
    source_sha = sha256_file(src / MANIFEST_FILE)
    return ReducedPrecision(
        precision=options.precision,
        source=f"{source.name} v{source.version} (manifest sha256 {source_sha})",
        method=method,
        eval_provider=eval_provider,
        max_accuracy_drop=options.max_accuracy_drop,
        tasks=accuracy,
        max_abs_diff=diff,
    )


def work_folder(out: Path) -> Path:
    """A new hidden folder next to ``out`` to write the bundle in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def write_bundle(src: Path, work: Path, out: Path, draft: Manifest, report: ReducedPrecision) -> Manifest:
    """Finish the manifest in ``work``, copy the run's config, move ``work`` to ``out`` and read it back."""
    final = draft.model_copy(
        update={
            "version": f"{draft.version}-{report.precision}",
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "parity": {},  # max |onnx - torch| no longer holds: see reduced_precision.max_abs_diff
            "reduced_precision": report,
        }
    )
    final = Manifest.model_validate(final.model_dump())  # re-validate the assembled manifest
    final.write(work)
    if (src / CONFIG).is_file():
        shutil.copy2(src / CONFIG, work / CONFIG)
    if out.exists():
        out.rmdir()
    os.replace(work, out)
    load_bundle(out)  # the result reads back and verifies
    return final
