"""A training run directory: weights as safetensors, everything else as JSON. Never pickle.

``RUN_DIR/{best,last}.safetensors``  the MultiTaskNet state dict
``RUN_DIR/config.json``              :class:`RunConfig`: backbone, plan, labels, timm data config, ...
``RUN_DIR/state.safetensors/.json``  what ``--resume`` needs (:mod:`training.optimizer_state`)

``RunConfig.plan`` is the one record of a run's sharing plan, as the network was built with it (a
proportion in the training config is resolved to its cut first); ``train_config.plan`` only records
what was asked for. :meth:`RunConfig.network` is the one place that turns it into a network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file

from models.network import MultiTaskNet

WEIGHTS = {"best": "best.safetensors", "last": "last.safetensors"}
CONFIG = "config.json"

PlanSpec = str | dict[str, dict[str, str] | str]  # "bottom:K" ... or {last unit: {task: variant}}


class TaskLabels(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    labels: list[str]


class RunConfig(BaseModel):
    """``config.json`` of a run (and of a bundle's checkpoint); unknown keys are kept as written."""

    model_config = ConfigDict(frozen=True, extra="allow")

    backbone: str
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    plan: PlanSpec
    tasks: dict[str, TaskLabels]
    data_config: dict[str, Any]
    accounting: dict[str, Any] | None = None
    train_config: dict[str, Any] = Field(default_factory=dict)
    step: int = 0
    best: dict[str, Any] | None = None

    @property
    def labels(self) -> dict[str, tuple[str, ...]]:
        return {t: tuple(v.labels) for t, v in self.tasks.items()}

    def network(self, template: torch.nn.Module | None = None) -> MultiTaskNet:
        """A fresh MultiTaskNet of this run's layout (``template``: the backbone to copy weights from)."""
        classes = {t: len(v.labels) for t, v in self.tasks.items()}
        return MultiTaskNet(self.backbone, classes, self.plan, template=template, **self.timm_kwargs)


@dataclass(frozen=True)
class RunInfo:
    """What the exporter needs besides the weights: the run's config and the step of the weights."""

    config: RunConfig
    step: int

    @property
    def labels(self) -> dict[str, tuple[str, ...]]:
        return self.config.labels

    @property
    def data_config(self) -> Mapping[str, Any]:
        return self.config.data_config


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2)))


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict on the CPU; a tensor tied to an earlier one (shared+bn) is copied, because
    safetensors stores no shared memory (loading writes the same values into the one tensor)."""
    out, seen = {}, set()
    for k, v in module.state_dict().items():
        t = v.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen and t.numel() else t.contiguous()
        seen.add(ptr)
    return out


def save_weights(run_dir: Path, which: str, net: torch.nn.Module) -> None:
    tensors = state_tensors(net)
    atomic_write(run_dir / WEIGHTS[which], lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))


def load_weights(run_dir: Path, which: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / WEIGHTS[which]))


def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / f).is_file() for f in WEIGHTS.values())


def write_config(run_dir: Path, config: RunConfig, step: int, best: Mapping[str, Any] | None) -> None:
    data = config.model_dump(mode="json") | {"step": step, "best": None if best is None else dict(best)}
    write_json(run_dir / CONFIG, data)


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The one reader of ``config.json``: a one-line error naming the file and the field."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run: no {CONFIG}")
    try:
        return RunConfig.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise ValueError(f"{path}: field {field}: {err['msg']}") from None


def load_run(run_dir: str | Path, which: str = "best") -> tuple[MultiTaskNet, RunInfo]:
    """The trained network (eval mode, CPU) and its metadata, from a run directory."""
    run_dir = Path(run_dir)
    if which not in WEIGHTS:
        raise ValueError(f"which must be one of {sorted(WEIGHTS)}, not {which!r}")
    weights = run_dir / WEIGHTS[which]
    if not weights.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no checkpoint {WEIGHTS[which]} (is it a finished training run?)"
        )
    cfg = read_run_config(run_dir)
    net = cfg.network()
    net.load_state_dict(load_file(str(weights)), strict=True)
    net.eval()
    step = int((cfg.best or {}).get("step", cfg.step)) if which == "best" else cfg.step
    return net, RunInfo(cfg, step)
