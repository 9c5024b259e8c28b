"""Export a MultiTaskNet to the bundle of DESIGN.md §3: one ONNX file per (segment, variant),
each checked with onnx.checker and against torch in onnxruntime at several batch sizes."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from contract.bundle import sha256_file
from contract.manifest import InputSpec, Manifest, SegmentSpec, TaskSpec, VariantSpec
from contract.plan import HEAD
from models.network import MultiTaskNet

PARITY_BATCHES = (1, 3, 16)
PARITY_TOLERANCE = 1e-4
OPSET = 18


class ExportError(RuntimeError):
    """An exported file failed its check."""


def _quiet():
    """The dynamo exporter prints progress and warnings; keep the CLI's output readable."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return stack


def export_module(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export one variant with a dynamic batch axis (dynamo exporter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: batch},),
            input_names=["input"],
            output_names=["output"],
            opset_version=OPSET,
            optimize=True,
            verify=False,
        )
        program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)


def check_parity(module: nn.Module, path: Path, inputs: torch.Tensor, batches: Sequence[int]) -> float:
    """Max |onnxruntime - torch| over the given batch sizes; raises ExportError above tolerance."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for n in batches:
        x = inputs[:n]
        with torch.no_grad():
            expected = module(x).numpy()
        (got,) = session.run(None, {"input": x.numpy()})
        if got.shape != expected.shape:
            raise ExportError(f"{path}: batch {n} gives shape {got.shape}, torch gives {expected.shape}")
        worst = max(worst, float(np.max(np.abs(got - expected))))
    if worst > PARITY_TOLERANCE:
        raise ExportError(f"{path}: max |onnx - torch| = {worst:.2e} exceeds {PARITY_TOLERANCE:.0e}")
    return worst


def _segment_inputs(net: MultiTaskNet, x: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
    """The real activations each (segment, variant) sees, from a task that uses that variant."""
    seen: dict[tuple[str, str], torch.Tensor] = {}
    with torch.no_grad():
        for task in net.task_names:
            h = x
            for seg in net.segments:
                vid = seg.plan.assignment[task]
                seen.setdefault((seg.name, vid), h)
                h = seg.variants[vid](h)
    return seen


def export_segment(
    seg, inputs: Mapping[tuple[str, str], torch.Tensor], out: Path, log
) -> tuple[SegmentSpec, float]:
    """Export and check every variant of one segment; its manifest entry and its worst parity."""
    variants: dict[str, VariantSpec] = {}
    parity = 0.0
    for vid, module in seg.variants.items():
        rel = Path("segments") / seg.name / f"{vid}.onnx"
        x = inputs[(seg.name, vid)]
        export_module(module, x[:2], out / rel)
        diff = check_parity(module, out / rel, x, PARITY_BATCHES)
        parity = max(parity, diff)
        params = sum(p.numel() for p in module.parameters())
        variants[vid] = VariantSpec(file=rel.as_posix(), sha256=sha256_file(out / rel), params=params)
        log(f"  {rel.as_posix():40s} params={params:>10,d}  max|onnx-torch|={diff:.1e}")
    x = inputs[(seg.name, next(iter(seg.variants)))]
    with torch.no_grad():
        y = next(iter(seg.variants.values()))(x[:1])
    spec = SegmentSpec(
        name=seg.name,
        input_shape=tuple(x.shape[1:]),
        output_shape=(-1,) if seg.name == HEAD else tuple(y.shape[1:]),
        variants=variants,
        units=list(seg.plan.units),
    )
    return spec, parity


def export_network(
    net: MultiTaskNet,
    out: str | Path,
    *,
    labels: Mapping[str, Sequence[str]],
    data_config: Mapping,
    name: str,
    version: str,
    seed: int = 0,
    log=print,
) -> Manifest:
    """Write the bundle for ``net`` into ``out`` (created; must be empty or absent)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out or remove it")
    missing = [t for t in net.task_names if t not in labels]
    if missing:
        raise ValueError(f"no labels for task(s) {missing}")
    net = net.eval().cpu().to(memory_format=torch.contiguous_format)
    input_spec = input_spec_from(data_config)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(max(PARITY_BATCHES), *input_spec.size, generator=generator)
    inputs = _segment_inputs(net, images)

    segments, parity = [], {}
    for seg in net.segments:
        spec, parity[seg.name] = export_segment(seg, inputs, out, log)
        segments.append(spec)
    acc = net.accounting()
    manifest = Manifest(
        name=name,
        version=version,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        backbone=net.backbone,
        plan=net.plan_spec if isinstance(net.plan_spec, str) else json.dumps(net.plan_spec),
        input=input_spec,
        segments=segments,
        tasks={
            t: TaskSpec(labels=list(labels[t]), variants={s.name: s.plan.assignment[t] for s in net.segments})
            for t in net.task_names
        },
        parity=parity,
        accounting=acc,
    )
    manifest.write(out)
    return manifest


def input_spec_from(data_config: Mapping) -> InputSpec:
    """timm's data config (resolve_data_config) -> the manifest's input spec."""
    return InputSpec(
        size=tuple(data_config["input_size"]),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        interpolation=data_config.get("interpolation", "bilinear"),
        crop_pct=float(data_config.get("crop_pct", 1.0)),
        crop_mode=data_config.get("crop_mode", "center"),
    )


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    which: str = "best",
    version: str | None = None,
    name: str | None = None,
    log=print,
) -> Manifest:
    """Export a training run directory (see training/run_files.py) into a bundle."""
    from training.run_files import load_run

    run_dir = Path(run_dir)
    net, info = load_run(run_dir, which=which)
    version = version or f"{info.step}"
    manifest = export_network(
        net,
        out,
        labels=info.labels,
        data_config=info.data_config,
        name=name or run_dir.name,
        version=version,
        log=log,
    )
    for extra in ("config.json",):
        if (run_dir / extra).exists():
            shutil.copy2(run_dir / extra, Path(out) / extra)
    ckpt = run_dir / f"{which}.safetensors"
    if ckpt.exists():
        shutil.copy2(ckpt, Path(out) / "checkpoint.safetensors")
    return manifest
