"""Helpers for the trainer tests (no tests here): tiny synthetic ImageFolder trees and configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

TASKS = {"alpha": 3, "beta": 5}


def make_tree(
    root: Path, tasks: dict[str, int] = TASKS, n_train: int = 12, n_val: int = 4, size: int = 16
) -> Path:
    """``root/<task>/{train,val}/<class>/*.png``: grayscale images whose brightness encodes the class."""
    rng = np.random.default_rng(0)
    for task, n_classes in tasks.items():
        for split, n in (("train", n_train), ("val", n_val)):
            for c in range(n_classes):
                folder = root / task / split / f"class{c}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    level = c * 200 / max(n_classes - 1, 1)
                    arr = np.clip(rng.normal(level, 15, (size, size)), 0, 255).astype(np.uint8)
                    Image.fromarray(arr, "L").save(folder / f"{i}.png")
    return root


def write_config(path: Path, data: Path, **overrides) -> Path:
    """A config for timm's ``test_resnet`` at 16 px, a few steps, no workers (fast on CPU)."""
    cfg = {
        "tasks": {t: {"root": str(data / t)} for t in TASKS},
        "backbone": "test_resnet",
        "plan": "bottom:2",
        "input_size": 16,
        "crop_pct": 1.0,
        "schedule": {"steps": 12, "warmup_steps": 2},
        "optimizer": {"lr": 0.003},
        "augment": {"hflip": 0.0},
        "batch_per_task": 6,
        "eval_interval": 6,
        "log_interval": 2,
        "workers": 0,
        "seed": 0,
    }
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path
