"""Pretrained weights the timm way (issue 15): a local file, hf-hub names and `true` through timm's own
loading, offline: a weights file and a hub cache the test lays out itself; one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from contract.errors import UserError  # noqa: E402
from training.pretrained import create_pretrained  # noqa: E402

HUB_ID = "timm/test_resnet.r160_in1k"  # test_resnet's default pretrained tag in timm's registry


@pytest.fixture
def source() -> torch.nn.Module:
    torch.manual_seed(3)
    return timm.create_model("test_resnet", num_classes=1000)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source) -> Path:
    """A Hugging Face cache holding HUB_ID's model.safetensors, the hub itself unreachable (offline)."""
    import huggingface_hub.constants as hub
    from safetensors.torch import save_file

    repo = tmp_path / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snap / "model.safetensors"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def _same_stem(a, b) -> bool:
    return torch.equal(a.conv1[0].weight, b.conv1[0].weight) and torch.equal(
        a.layer4[0].conv1.weight, b.layer4[0].conv1.weight
    )


def test_local_file_through_timm(tmp_path: Path, source) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = create_pretrained(
        "test_resnet", 5, tmp_path / "w.safetensors"
    )  # (.pth: tests/test_train_loop.py)
    assert _same_stem(model, source) and model.fc.out_features == 5  # classifier of another size dropped
    with pytest.raises(UserError, match="pretrained weights not found"):
        create_pretrained("test_resnet", 5, tmp_path / "none.pth")
    bad = {k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith("layer4")}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match="do not fit backbone test_resnet") as err:
        create_pretrained("test_resnet", 5, tmp_path / "bad.safetensors")
    assert "\n" not in str(err.value) and "layer4" in str(err.value)


def test_hub_names_from_a_cache_and_unreachable_hub(offline_hub: Path, source) -> None:
    assert _same_stem(create_pretrained("test_resnet", 5, f"hf-hub:{HUB_ID}"), source)
    assert _same_stem(create_pretrained("test_resnet", 5, True), source)  # `pretrained: true`
    with pytest.raises(UserError, match="hub is unreachable") as err:
        create_pretrained("test_resnet", 5, "hf-hub:timm/not-in-the-cache")
    assert "\n" not in str(err.value) and "--pretrained PATH" in str(err.value)
    with pytest.raises(UserError, match="ORG/NAME"):
        create_pretrained("test_resnet", 5, "hf-hub:resnet18")


def test_config_pretrained_reaches_every_variant(tmp_path: Path, offline_hub: Path, source) -> None:
    from tests.test_experiment import _image_folder
    from training.config import parse_config
    from training.imagefolder import load_task
    from training.run_setup import build_run

    data = _image_folder(tmp_path / "d", {"a": 2, "b": 3})
    tasks = {t: {"root": str(data / t)} for t in ("a", "b")}
    cfg = parse_config({"tasks": tasks, "backbone": "test_resnet", "plan": "bottom:1", "pretrained": True,
                        "input_size": 32})  # fmt: skip
    net = build_run(cfg, [load_task(n, t.root) for n, t in cfg.tasks.items()]).net
    for task in ("a", "b"):  # every stem variant starts from the pretrained stem
        assert torch.equal(net.variant_module("stem", task)[0][0][0].weight, source.conv1[0].weight)
    fresh = build_run(cfg, [load_task(n, t.root) for n, t in cfg.tasks.items()], pretrained=False).net
    assert not torch.equal(fresh.variant_module("stem", "a")[0][0][0].weight, source.conv1[0].weight)
