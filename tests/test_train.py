"""Trainer config and data: one-line errors, image modes, corrupt images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_train_support import make_tree, write_config

from service.cli import main

pytest.importorskip("torch")
pytest.importorskip("timm")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("data"))


def _train_error(capsys, cfg_path, *extra) -> str:
    code = main(["train", "--config", str(cfg_path), "--out", str(cfg_path.parent / "run"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("mtserve train: error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"plan": {"layer4.0": {"alpha": "shared", "gamma": "x"}}}, "unknown task(s) ['gamma']"),
        ({"plan": "bottom:99"}, "K=99 out of range"),
        ({"plan": "bottom:x"}, "K must be an integer"),
        ({"plan": "sideways"}, "unknown plan"),
        ({"backbone": "no_such_net"}, "unknown backbone 'no_such_net'"),
        ({"batch_per_task": 0}, "batch_per_task"),
        ({"schedule": {"steps": 5, "warmup_steps": 5}}, "warmup_steps (5) must be smaller"),
        ({"learning_rate": 1}, "learning_rate: Extra inputs are not permitted"),
        ({"tasks": {}}, "at least one task"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_config_errors_are_one_line(tmp_path, capsys, data, overrides, needle):
    err = _train_error(capsys, write_config(tmp_path / "c.yaml", data, **overrides))
    assert needle in err


def test_missing_config_and_bad_yaml(tmp_path, capsys):
    assert "config file not found" in _train_error(capsys, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [unclosed")
    assert "not valid YAML" in _train_error(capsys, bad)


def test_relative_roots_resolve_against_the_config_file(tmp_path, data):
    from training.config import load_config

    (tmp_path / "sub").mkdir()
    cfg_path = write_config(tmp_path / "sub" / "c.yaml", data, tasks={"alpha": {"root": "../d/alpha"}})
    assert load_config(cfg_path).tasks["alpha"].root == str(tmp_path / "sub" / "../d/alpha")


def test_proportion_plan_resolves_to_a_cut(tmp_path, data):
    from training.config import load_config
    from training.imagefolder import load_task
    from training.run_setup import build_run

    cfg = load_config(write_config(tmp_path / "c.yaml", data, plan={"kind": "bottom", "proportion": 0.05}))
    run = build_run(cfg, [load_task(n, t.root) for n, t in cfg.tasks.items()])
    assert run.config.plan.startswith("bottom:")


@pytest.mark.parametrize(
    ("breakage", "needle"),
    [
        (lambda d: __import__("shutil").rmtree(d / "beta" / "val"), "missing folder"),
        (lambda d: [p.unlink() for p in (d / "beta" / "train").rglob("*.png")], "has no images"),
        (lambda d: __import__("shutil").rmtree(d / "beta"), "data folder not found"),
        (lambda d: (d / "beta" / "val" / "class9").mkdir(), "classes differ"),
    ],
)
def test_data_folder_errors(tmp_path, capsys, breakage, needle):
    data = make_tree(tmp_path / "d", n_train=2, n_val=1)
    breakage(data)
    assert needle in _train_error(capsys, write_config(tmp_path / "c.yaml", data))


def test_one_class_task_is_an_error(tmp_path, capsys):
    data = make_tree(tmp_path / "d", {"alpha": 3, "beta": 1}, n_train=2, n_val=1)
    assert "needs at least 2 classes" in _train_error(capsys, write_config(tmp_path / "c.yaml", data))


def test_image_modes_load_as_rgb(tmp_path):
    from training.imagefolder import load_image

    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    images = {
        "gray.png": Image.fromarray(g, "L"),
        "rgba.png": Image.fromarray(np.dstack([g, g, g, g]), "RGBA"),
        "palette.png": Image.fromarray(np.dstack([g, g, g]), "RGB").convert("P"),
        "la.png": Image.fromarray(np.dstack([g, g]), "LA"),
        "cmyk.jpg": Image.fromarray(np.dstack([g, g, g]), "RGB").convert("CMYK"),
    }
    wide = Image.fromarray(g.astype(np.uint16) * 257)
    images["sixteen.png"] = wide if wide.mode.startswith("I") else wide.convert("I;16")
    for name, img in images.items():
        img.save(tmp_path / name)
        out = load_image(str(tmp_path / name))
        assert out.mode == "RGB" and out.size == (8, 8), name
    sixteen = np.asarray(load_image(str(tmp_path / "sixteen.png")))
    assert abs(int(sixteen[7, 7, 0]) - int(g[7, 7])) <= 1  # rescaled, not clipped to 255


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    import torch

    from training.config import load_config
    from training.trainer import train

    data = make_tree(tmp_path / "d", n_train=3, n_val=2)
    (data / "alpha" / "train" / "class0" / "0.png").write_bytes(b"not a png at all")
    (data / "alpha" / "train" / "class1" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = load_config(write_config(tmp_path / "c.yaml", data, schedule={"steps": 4, "warmup_steps": 1}))
    torch.set_num_threads(1)
    result = train(cfg, tmp_path / "run", progress=False, say=lambda *_: None)
    assert result.skipped == {"alpha": 2}
