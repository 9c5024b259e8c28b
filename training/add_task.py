"""Add a task to a trained bundle: train only its own variants on the frozen shared segments.

The bundle's checkpoint and config rebuild the torch network. The new task gets its own variant of
every task-specific segment (the stem and the head for ``bottom:K``; ``own`` = K units from the
bottom when the plan's segment boundaries allow) and uses the existing variants elsewhere. Only the
new variants train: every other parameter has ``requires_grad=False`` and every other module stays
in eval mode, so BatchNorm statistics of shared segments do not move either. The other tasks'
parameters and logits are checked bit for bit after training. Only the new variants are exported
(ONNX, parity-checked against torch like ``mtserve export``); every other file is copied byte for
byte, so a server reloading the new version reuses the sessions of those files.

The pieces: :mod:`training.add_task_network` (the network rebuilt and extended),
:mod:`training.add_task_train` (the new variants trained on the frozen trunk),
:mod:`training.add_task_guard` (the bit-identity check), :mod:`training.add_task_export` (the new
files and the new bundle version), :mod:`training.add_task_config` (:class:`AddTaskConfig`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from contract.errors import UserError
from contract.manifest import Manifest
from models.network import MultiTaskNet
from training.add_task_bundle import check_out_dir, history_entry, open_source
from training.add_task_config import DEFAULT_INIT, AddTaskConfig, Init
from training.add_task_export import write_bundle, write_config
from training.add_task_guard import check_unchanged, snapshot
from training.add_task_network import attach_task, choose_donor, load_bundle_net, owned_segments
from training.add_task_train import train_new_task
from training.config import AugmentConfig, OptimizerConfig
from training.imagefolder import TaskData, load_task, transforms
from training.run_setup import pick_device

__all__ = ["DEFAULT_INIT", "AddTaskConfig", "AddTaskResult", "Extended", "Init", "add_task", "extend_network"]


@dataclass
class AddTaskResult:
    out: Path
    manifest: Manifest
    task: str
    val: dict[str, float]
    best_step: int
    donor: str | None
    probe: dict[str, float]
    owned: list[str]
    new_files: dict[str, int]  # file -> bytes
    unchanged_files: int
    trainable_params: int
    others_bit_identical: bool
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        acc = self.manifest.accounting
        return {
            "task": self.task,
            "bundle": str(self.out),
            "version": self.manifest.version,
            "val": self.val,
            "best_step": self.best_step,
            "init_from": self.donor,
            "donor_probe": self.probe,
            "owned_segments": self.owned,
            "new_files": self.new_files,
            "unchanged_files": self.unchanged_files,
            "trainable_params": self.trainable_params,
            "task_specific_share": self.trainable_params / acc.total_params if acc else None,
            "accounting": acc.model_dump() if acc else None,
            "others_bit_identical": self.others_bit_identical,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


@dataclass
class Extended:
    """The in-memory outcome of adding a task to a network (no files)."""

    data: TaskData
    owned: list[int]
    donor: str
    probe: dict[str, float]
    val: dict[str, float]
    best_step: int
    trainable: int
    times: dict[str, float]


def device_for(kind: str) -> torch.device:
    try:
        return pick_device(kind)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _announce(net: MultiTaskNet, task: str, ext: Extended, init: Init, say: Callable[[str], None]) -> None:
    data, probe, trainable = ext.data, ext.probe, ext.trainable
    owned_names = [net.segments[i].name for i in ext.owned]
    probed = ", ".join(f"{t} {a:.3f}" for t, a in probe.items())
    say(
        f"adding {task!r} ({len(data.classes)} classes, {len(data.train)} train / {len(data.val)} val): "
        f"own {owned_names}, {trainable:,} trainable parameters "
        f"({trainable / max(sum(p.numel() for p in net.parameters()), 1):.1%} of the new model); init "
        + (f"from the variants of {ext.donor!r}" if init == "stem" else "from scratch")
        + (f" (nearest-class-mean probe: {probed})" if probe else "")
    )


def extend_network(
    net: MultiTaskNet,
    run_cfg: dict[str, Any],
    task: str,
    data_root: str | Path,
    cfg: AddTaskConfig,
    *,
    progress: bool = False,
    say: Callable[[str], None] = print,
    where: str = "the bundle",
) -> Extended:
    """Add ``task`` to ``net`` (built from ``run_cfg``, a run's or bundle's config.json) and train its
    own variants; raises if any other task's parameter, buffer or logit moved by one bit."""
    if task in net.task_names:
        raise UserError(f"task {task!r} is already in {where}; remove it first or pick another name")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_task(task, data_root)
    train_cfg = run_cfg.get("train_config") or {}
    augment = cfg.augment or AugmentConfig.model_validate(train_cfg.get("augment") or {})
    optimizer = cfg.optimizer or OptimizerConfig.model_validate(train_cfg.get("optimizer") or {})
    dc = dict(run_cfg["data_config"])
    train_tf, eval_tf = transforms(dc, augment)
    before = snapshot(net, list(net.task_names), tuple(dc["input_size"]))
    owned = owned_segments(net, cfg.own)

    t1 = time.perf_counter()
    donor, probe = choose_donor(net, owned, data, eval_tf, cfg, where)
    ext = Extended(data, owned, donor, probe, {}, 0, 0, {"probe_s": time.perf_counter() - t1})
    timm_kwargs = dict(run_cfg.get("timm_kwargs") or {})
    modules = attach_task(net, task, len(data.classes), owned, donor, cfg.init, cfg.seed, timm_kwargs)
    ext.trainable = sum(p.numel() for m in modules for p in m.parameters())
    _announce(net, task, ext, cfg.init, say)

    t2 = time.perf_counter()
    device = device_for(cfg.device)
    ext.val, ext.best_step = train_new_task(
        net, task, modules, data, (train_tf, eval_tf), cfg, optimizer, device, progress, say
    )
    net.cpu()
    ext.times["train_s"] = time.perf_counter() - t2
    check_unchanged(net, before)  # parameters, buffers (BatchNorm statistics) and logits, bit for bit
    return ext


def _check_request(source: Path, old: Manifest, out: Path, task: str) -> None:
    check_out_dir(out, source)
    if not task or "/" in task or task.startswith(".") or task != task.strip():
        raise UserError(f"bad task name {task!r}")
    if task in old.tasks:
        raise UserError(f"task {task!r} is already in {source}; remove it first or pick another name")


def add_task(
    bundle: str | Path,
    task: str,
    data_root: str | Path,
    out: str | Path,
    cfg: AddTaskConfig | None = None,
    *,
    version: str | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> AddTaskResult:
    """Write ``out``: ``bundle`` plus ``task`` trained on ``data_root`` (ImageFolder train/ + val/)."""
    cfg = cfg or AddTaskConfig()
    t0 = time.perf_counter()
    source, old = open_source(bundle)
    out = Path(out)
    _check_request(source, old, out, task)
    net, run_cfg = load_bundle_net(source, old)
    times = {"load_s": time.perf_counter() - t0}
    ext = extend_network(net, run_cfg, task, data_root, cfg, progress=progress, say=say, where=str(source))
    times |= ext.times
    owned_names = [old.segments[i].name for i in ext.owned]
    labels = list(ext.data.classes)

    t3 = time.perf_counter()
    new_version = version or f"{old.version}+{task}"
    written = write_bundle(
        net, task, labels, (source, old), out, ext.owned,
        run_plan=run_cfg["plan"], seed=cfg.seed, version=new_version, say=say,
    )  # fmt: skip
    times["export_s"] = time.perf_counter() - t3
    times["total_s"] = time.perf_counter() - t0
    entry = history_entry(
        "add-task", task, old, to_version=new_version, data=str(Path(data_root).resolve()),
        config=cfg.model_dump(mode="json"), init_from=ext.donor if cfg.init == "stem" else None,
        owned_segments=owned_names, val=ext.val, best_step=ext.best_step, wall_s=round(times["total_s"], 1),
    )  # fmt: skip
    write_config(out, run_cfg, task, labels, written, entry)
    return AddTaskResult(
        out=out,
        manifest=written.manifest,
        task=task,
        val=ext.val,
        best_step=ext.best_step,
        donor=ext.donor,
        probe=ext.probe,
        owned=owned_names,
        new_files=written.new_files,
        unchanged_files=written.unchanged_files,
        trainable_params=ext.trainable,
        others_bit_identical=True,
        timings=times,
    )
