"""Run directories: weights as safetensors, everything else as JSON. Never pickle.

``RUN_DIR/{best,last}.safetensors``  the MultiTaskNet state dict
``RUN_DIR/config.json``              backbone, plan, labels, timm data config, train config, step, best
``RUN_DIR/state.safetensors/.json``  optimizer tensors / optimizer groups + scheduler + progress (resume)
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.network import MultiTaskNet

WEIGHTS = {"best": "best.safetensors", "last": "last.safetensors"}
CONFIG, STATE, STATE_TENSORS = "config.json", "state.json", "state.safetensors"


@dataclass(frozen=True)
class RunInfo:
    """What the exporter needs besides the weights."""

    backbone: str
    plan: Any  # "bottom:K" ... or an explicit mapping
    labels: Mapping[str, tuple[str, ...]]
    data_config: Mapping[str, Any]
    config: Mapping[str, Any] = field(repr=False)  # the whole config.json
    step: int = 0
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2)))


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_weights(run_dir: Path, which: str, net: torch.nn.Module) -> None:
    tensors = state_tensors(net)
    _atomic_write(run_dir / WEIGHTS[which], lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))


def write_config(run_dir: Path, meta: Mapping[str, Any], step: int, best: Mapping[str, Any] | None) -> None:
    _write_json(run_dir / CONFIG, {**meta, "step": step, "best": best})


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        rest["state"][str(pid)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = value.detach().cpu().contiguous()
                rest["state"][str(pid)][name] = {"tensor": f"opt.{pid}.{name}"}
            else:
                rest["state"][str(pid)][name] = value
    return tensors, rest


def save_state(run_dir: Path, optimizer, scheduler, scaler, progress: Mapping[str, Any]) -> None:
    """Everything ``--resume`` needs beyond the weights, without pickle."""
    tensors, opt = _split_optimizer(optimizer.state_dict())
    data = {"optimizer": opt, "scheduler": scheduler.state_dict(), "progress": dict(progress)}
    if scaler is not None and scaler.is_enabled():
        data["scaler"] = {
            k: float(v) if isinstance(v, torch.Tensor) else v for k, v in scaler.state_dict().items()
        }
    _atomic_write(run_dir / STATE_TENSORS, lambda p: save_file(tensors, str(p)))
    _write_json(run_dir / STATE, data)


def load_state(run_dir: Path, optimizer, scheduler, scaler) -> dict[str, Any]:
    """Restore optimizer/scheduler/scaler; returns the saved progress (step, best, ...)."""
    data = json.loads((run_dir / STATE).read_text())
    tensors = load_file(str(run_dir / STATE_TENSORS))
    opt = data["optimizer"]
    state = {
        int(pid): {
            k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in e.items()
        }
        for pid, e in opt["state"].items()
    }
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in opt["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(data["scheduler"])
    if scaler is not None and "scaler" in data:
        scaler.load_state_dict(data["scaler"])
    return data["progress"]


def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / f).is_file() for f in WEIGHTS.values())


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run: no {CONFIG}")
    return json.loads((run_dir / CONFIG).read_text())


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
    labels = {t: tuple(v["labels"]) for t, v in cfg["tasks"].items()}
    kwargs = dict(cfg.get("timm_kwargs") or {})
    net = MultiTaskNet(cfg["backbone"], {t: len(v) for t, v in labels.items()}, cfg["plan"], **kwargs)
    net.load_state_dict(load_file(str(weights)), strict=True)
    net.eval()
    best = cfg.get("best") or {}
    step = int(best.get("step", cfg["step"])) if which == "best" else int(cfg["step"])
    info = RunInfo(cfg["backbone"], cfg["plan"], labels, cfg["data_config"], cfg, step, kwargs)
    return net, info


def load_pretrained(template: torch.nn.Module, path: str | Path) -> None:
    """Load a local timm/torchvision checkpoint into the template model; the classifier is reset."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses arbitrary pickles: say so in one line
            raise ValueError(f"{path}: cannot read as a weights-only torch checkpoint ({exc})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    classifier = (
        template.pretrained_cfg.get("classifier", "fc") if hasattr(template, "pretrained_cfg") else "fc"
    )
    prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
    own = {k: v for k, v in template.state_dict().items() if not k.startswith(prefixes)}
    state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems = [
        f"{label} {len(keys)} key(s) e.g. {keys[:4]}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch in", shape))
        if keys
    ]
    if problems:
        raise ValueError(f"{path} does not fit backbone {type(template).__name__}: " + "; ".join(problems))
    template.load_state_dict(state, strict=False)


def pick_device(kind: str) -> torch.device:
    """``auto``: CUDA when available. Asking for CUDA without one is a clear error."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available (use --device cpu or auto)")
    return torch.device("cuda" if kind != "cpu" and torch.cuda.is_available() else "cpu")


@dataclass
class BuiltRun:
    """A fresh network for a config plus what ``config.json`` records about it."""

    net: MultiTaskNet
    meta: dict[str, Any]
    train_tf: Any
    eval_tf: Any


def build_run(cfg, data, pretrained: str | Path | None = None) -> BuiltRun:
    """Resolve the plan, build the template (with pretrained weights) and the MultiTaskNet, transforms."""
    from models.backbone import create_backbone
    from models.network import plan_for_proportion
    from training.imagefolder import data_config, transforms

    classes = {d.name: len(d.classes) for d in data}
    plan = cfg.plan
    if hasattr(plan, "proportion"):
        plan, _ = plan_for_proportion(cfg.backbone, classes, plan.kind, plan.proportion, **cfg.timm_kwargs)
    template = create_backbone(cfg.backbone, num_classes=classes[data[0].name], **cfg.timm_kwargs)
    if pretrained:
        load_pretrained(template, pretrained)
    net = MultiTaskNet(cfg.backbone, classes, plan, template=template, **cfg.timm_kwargs)
    dc = data_config(template, cfg.image_hw, cfg.crop_pct)
    train_tf, eval_tf = transforms(dc, cfg.augment)
    keys = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
    meta = {
        "backbone": cfg.backbone,
        "timm_kwargs": dict(cfg.timm_kwargs),
        "plan": plan,
        "tasks": {d.name: {"labels": list(d.classes)} for d in data},
        "data_config": {"input_size": list(dc["input_size"])} | {k: _jsonable(dc[k]) for k in keys},
        "accounting": net.accounting().as_dict(),
        "train_config": cfg.model_dump(mode="json"),
    }
    return BuiltRun(net, meta, train_tf, eval_tf)


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


class MetricsLog:
    """``metrics.csv``: one row per log interval; val columns filled at evaluations."""

    def __init__(self, path: Path, tasks: list[str], classes: dict[str, int], start_step: int):
        self.path = path
        self.columns = [
            "step",
            "lr",
            "loss",
            *[f"loss_{t}" for t in tasks],
            *[f"val_top1_{t}" for t in tasks],
        ]
        self.columns += [f"val_top5_{t}" for t in tasks if classes[t] >= 5] + [
            "val_mean_top1",
            "images_per_s",
        ]
        rows = []
        if start_step and path.is_file():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)

    def plot(self, out: Path, tasks: list[str]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with self.path.open() as f:
            rows = list(csv.DictReader(f))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for t in tasks:
            pts = [(int(r["step"]), float(r[f"loss_{t}"])) for r in rows if r[f"loss_{t}"]]
            ax1.plot(*zip(*pts, strict=True), label=t) if pts else None
            pts = [(int(r["step"]), float(r[f"val_top1_{t}"])) for r in rows if r[f"val_top1_{t}"]]
            ax2.plot(*zip(*pts, strict=True), marker="o", label=t) if pts else None
        ax1.set(xlabel="step", ylabel="train loss", yscale="log", title="training loss per task")
        ax2.set(xlabel="step", ylabel="val top-1", ylim=(0, 1), title="validation accuracy per task")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)


def load_weights(run_dir: Path, which: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / WEIGHTS[which]))
