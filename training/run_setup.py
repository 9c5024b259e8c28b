"""A new run: the device, the resolved plan, the network (with pretrained weights), the transforms."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.network import MultiTaskNet
from training.run_files import RunConfig


def pick_device(kind: str) -> torch.device:
    """``auto``: CUDA when available. Asking for CUDA without one is a clear error."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available (use --device cpu or auto)")
    return torch.device("cuda" if kind != "cpu" and torch.cuda.is_available() else "cpu")


@dataclass
class BuiltRun:
    """A fresh network for a config plus what ``config.json`` records about it."""

    net: MultiTaskNet
    config: RunConfig
    train_tf: Any
    eval_tf: Any


def build_run(cfg, data, pretrained: str | bool | Path | None = None) -> BuiltRun:
    """Resolve the plan, build the template (with pretrained weights) and the MultiTaskNet, transforms."""
    from models.backbone import create_backbone
    from models.network import plan_for_proportion
    from training.imagefolder import data_config, transforms
    from training.pretrained import create_pretrained

    classes = {d.name: len(d.classes) for d in data}
    plan = cfg.plan
    if hasattr(plan, "proportion"):
        plan, _ = plan_for_proportion(cfg.backbone, classes, plan.kind, plan.proportion, **cfg.timm_kwargs)
    if pretrained is None:  # False: none, not even the config's (a resumed run has its own weights)
        pretrained = getattr(cfg, "pretrained", False)
    first = classes[data[0].name]
    if pretrained:
        template = create_pretrained(cfg.backbone, first, pretrained, **cfg.timm_kwargs)
    else:
        template = create_backbone(cfg.backbone, num_classes=first, **cfg.timm_kwargs)
    dc = data_config(template, cfg.image_hw, cfg.crop_pct)
    train_tf, eval_tf = transforms(dc, cfg.augment)
    keys = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
    config = RunConfig(
        backbone=cfg.backbone,
        timm_kwargs=dict(cfg.timm_kwargs),
        plan=plan,
        tasks={d.name: {"labels": list(d.classes)} for d in data},
        data_config={"input_size": list(dc["input_size"])} | {k: _jsonable(dc[k]) for k in keys},
        train_config=cfg.model_dump(mode="json"),
    )
    net = config.network(template)
    config = config.model_copy(update={"accounting": net.accounting().model_dump()})
    return BuiltRun(net, config, train_tf, eval_tf)


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
