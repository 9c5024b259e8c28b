"""Shared fixtures: a real exported bundle (torch -> ONNX), built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_TASKS = {"digits": 10, "animals": 10, "shapes": 4}
TINY_INPUT = {
    "input_size": (3, 32, 32),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
}


def build_tiny_bundle(out: Path, *, plan: str = "bottom:1", version: str = "1", seed: int = 0) -> Path:
    """A 3-task bundle of timm's ``test_resnet`` at 32x32 with random weights (fast to export)."""
    import torch

    from models.network import MultiTaskNet
    from training.export import export_network

    torch.manual_seed(seed)
    net = MultiTaskNet("test_resnet", TINY_TASKS, plan)
    labels = {t: [f"{t}_{i}" for i in range(n)] for t, n in TINY_TASKS.items()}
    export_network(
        net, out, labels=labels, data_config=TINY_INPUT, name="tiny", version=version, log=lambda *_: None
    )
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to a real exported bundle: 3 tasks (digits, animals, shapes), plan bottom:1, 32x32 input."""
    pytest.importorskip("torch")
    return build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")
