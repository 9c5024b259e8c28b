"""Optimizer, scheduler and grad-scaler state for ``--resume``, without pickle.

``RUN_DIR/state.safetensors`` holds the optimizer's tensors, ``RUN_DIR/state.json`` the rest
(param groups, scheduler, scaler, progress), the tensors named by key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from training.run_files import atomic_write, write_json

STATE, STATE_TENSORS = "state.json", "state.safetensors"


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
    atomic_write(run_dir / STATE_TENSORS, lambda p: save_file(tensors, str(p)))
    write_json(run_dir / STATE, data)


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
