"""The new bundle version add-task writes: only the new task's own variants are exported (ONNX,
parity-checked against torch like ``mtserve export``); every other file is copied byte for byte, so
a server reloading the new version reuses the sessions of those files. Then the manifest (plan and
accounting recomputed), the checkpoint and the config with its history entry."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from contract.bundle import sha256_file
from contract.errors import UserError
from contract.manifest import Manifest, TaskSpec, VariantSpec
from models.network import MultiTaskNet
from training import add_task_bundle as nb
from training.export import PARITY_BATCHES, check_parity, export_module


def export_new_variants(
    net: MultiTaskNet, task: str, owned: Sequence[int], manifest: Manifest, out: Path, seed: int, say
) -> tuple[dict[int, VariantSpec], dict[int, float]]:
    """Export the new task's own variants only (ONNX + parity check at several batch sizes)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(max(PARITY_BATCHES), *manifest.input.size, generator=gen)
    specs, parity = {}, {}
    for i, seg in enumerate(net.segments):
        module = seg.variants[seg.plan.assignment[task]]
        if i in owned:
            rel = Path("segments") / manifest.segments[i].name / f"{task}.onnx"
            if (out / rel).exists():
                raise UserError(f"{out / rel} already exists in the new bundle; pick another task name")
            export_module(module, h[:2], out / rel)
            diff = check_parity(module, out / rel, h, PARITY_BATCHES)
            params = sum(p.numel() for p in module.parameters())
            specs[i] = VariantSpec(file=rel.as_posix(), sha256=sha256_file(out / rel), params=params)
            parity[i] = diff
            say(f"  {rel.as_posix():40s} params={params:>10,d}  max|onnx-torch|={diff:.1e}")
        with torch.no_grad():
            h = module(h)
    return specs, parity


def new_manifest(
    old: Manifest,
    net: MultiTaskNet,
    task: str,
    labels: list[str],
    exported: tuple[dict[int, VariantSpec], dict[int, float]],
    version: str,
    run_plan: Any,
) -> tuple[Manifest, Any]:
    """The old manifest plus the task (its new variants, the others' it uses) and the plan spec that
    rebuilds the new layout; not yet written (no accounting)."""
    specs, parity = exported
    segments, variants = [], {}
    for i, seg in enumerate(old.segments):
        vs = dict(seg.variants)
        if i in specs:
            vs[task] = specs[i]
        segments.append(seg.model_copy(update={"variants": vs}).model_dump())
        variants[seg.name] = net.segments[i].plan.assignment[task]
    new_parity = dict(old.parity)
    for i, diff in parity.items():
        name = old.segments[i].name
        new_parity[name] = max(new_parity.get(name, 0.0), diff)
    data = old.model_dump()
    data.update(
        version=version,
        created_at=nb.now(),
        segments=segments,
        tasks={**{t: s.model_dump() for t, s in old.tasks.items()}, task: TaskSpec(
            labels=labels, variants=variants).model_dump()},
        parity=new_parity,
    )  # fmt: skip
    manifest = Manifest.model_validate(data)
    plan = nb.plan_for(manifest, run_plan)
    if plan is None:  # cannot happen: the old segments differ on the old tasks
        raise RuntimeError("no sharing plan rebuilds the new layout")
    return manifest.model_copy(update={"plan": plan if isinstance(plan, str) else json.dumps(plan)}), plan


@dataclass
class Written:
    """What :func:`write_bundle` wrote: the final manifest, the plan spec, the new files' sizes and
    how many files were copied unchanged."""

    manifest: Manifest
    plan: Any
    new_files: dict[str, int]  # file -> bytes
    unchanged_files: int


def write_bundle(
    net: MultiTaskNet,
    task: str,
    labels: list[str],
    source: tuple[Path, Manifest],
    out: Path,
    owned: Sequence[int],
    *,
    run_plan: Any,
    seed: int,
    version: str,
    say: Callable[[str], None],
) -> Written:
    """Copy the old files, export the new variants, write the manifest and the checkpoint."""
    root, old = source
    out.mkdir(parents=True, exist_ok=True)
    keep = [(s.name, vid) for s in old.segments for vid in s.variants]
    nb.copy_variant_files(root, out, old, keep)
    say(f"exporting the new variants of {task!r} (every other file copied byte for byte):")
    exported = export_new_variants(net, task, owned, old, out, seed, say)
    manifest, plan = new_manifest(old, net, task, labels, exported, version, run_plan)
    manifest = nb.finish_manifest(manifest, out)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
        str(out / nb.CHECKPOINT),
        metadata={"format": "pt"},
    )
    specs = exported[0]
    new_files = {specs[i].file: (out / specs[i].file).stat().st_size for i in specs}
    return Written(manifest, plan, new_files, len(keep))


def write_config(
    out: Path, run_cfg: dict[str, Any], task: str, labels: list[str], written: Written, entry: dict[str, Any]
) -> None:
    """The bundle's config.json: the run's, with the new plan, task, accounting and history entry."""
    acc = written.manifest.accounting
    new_cfg = dict(run_cfg)
    new_cfg.update(
        plan=written.plan,
        tasks={**run_cfg["tasks"], task: {"labels": labels}},
        accounting=acc.model_dump() if acc else None,
        history=[*run_cfg.get("history", []), entry],
    )
    nb.write_json(out / nb.CONFIG, new_cfg)
