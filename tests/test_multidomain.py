"""The multi-domain benchmark and its control, on synthetic sources (fast) and, where the
Debian packages are installed, on real ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.cli import UserError, main
from training import multidomain, sources
from training.demo_data import plan_task
from training.sources import Source, SourceUnavailable

pytest.importorskip("PIL")


def _fake(
    name: str, classes: int = 3, per_class: int = 20, groups: int | None = None, rgb: bool = False
) -> Source:
    rng = np.random.default_rng(len(name))
    n = classes * per_class
    shape = (n, 12, 12, 3) if rgb else (n, 12, 12)
    g = None if groups is None else np.arange(n) % groups
    return Source(
        name, rng.integers(0, 256, shape, dtype=np.uint8), np.arange(n) % classes,
        tuple(f"{name}-c{i}" for i in range(classes)), licence="test", origin="synthetic",
        groups=g, group_kind="font" if groups else "image",
    )  # fmt: skip


def _missing() -> Source:
    raise SourceUnavailable("Fashion-MNIST not found: apt-get install dataset-fashion-mnist")


@pytest.fixture
def fake_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sources.LOADERS, "fashion", _missing)
    monkeypatch.setitem(sources.LOADERS, "mnist", lambda: _fake("mnist", 10, 8))
    monkeypatch.setitem(sources.LOADERS, "glyphs", lambda: _fake("glyphs", 4, 30, groups=10))
    monkeypatch.setitem(sources.LOADERS, "emoji", lambda: _fake("emoji", 3, 10, rgb=True))


def test_multidomain_skips_missing_source(fake_sources: None, tmp_path: Path) -> None:
    messages: list[str] = []
    card, _ = multidomain.build_multidomain(
        tmp_path / "m", sources=["fashion", "mnist", "glyphs", "emoji"], max_per_class=5, log=messages.append
    )
    assert list(card["tasks"]) == ["mnist", "glyphs", "emoji"]
    assert "apt-get install dataset-fashion-mnist" in card["skipped"]["fashion"]
    assert len(messages) == 1 and messages[0].startswith("skipping fashion:")
    assert not (tmp_path / "m" / "fashion").exists()
    md = (tmp_path / "m" / "card.md").read_text()
    assert "~~fashion~~" in md and "| glyphs |" in md
    assert card["tasks"]["glyphs"]["split"] == "held-out fonts"
    assert card["tasks"]["mnist"]["counts"] == {"train": 50, "val": 20}


def test_multidomain_needs_one_source(fake_sources: None, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="every source is unavailable"):
        multidomain.build_multidomain(tmp_path / "m", sources=["fashion"], log=lambda _m: None)
    with pytest.raises(UserError, match="at least one source"):
        multidomain.build_multidomain(tmp_path / "m", sources=[], log=lambda _m: None)
    assert not (tmp_path / "m").exists()


def test_cli_mdb_skip_message(fake_sources: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["data", "mdb", "--out", str(tmp_path / "m"), "--sources", "fashion,emoji", "--max-per-class", "3"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "skipping fashion: Fashion-MNIST not found" in captured.err
    assert "skipped: fashion" in captured.out
    assert main(["data", "mdb", "--out", str(tmp_path / "x"), "--sources", "fashion"]) == 2
    assert "every source is unavailable" in capsys.readouterr().err


def test_group_split_holds_out_whole_groups() -> None:
    src = _fake("glyphs", classes=36, per_class=40, groups=40)  # 40 "fonts" x 36 glyphs
    for seed in range(3):
        data = plan_task(src, "glyphs", None, 0.2, seed)
        train_fonts, val_fonts = set(src.groups[data.train]), set(src.groups[data.val])
        assert not train_fonts & val_fonts
        assert len(val_fonts) == 8 and len(train_fonts) == 32
        assert np.bincount(src.labels[data.val]).tolist() == [8] * 36


@pytest.mark.skipif(not Path("/usr/share/fonts").is_dir(), reason="needs fonts-* packages")
def test_real_glyph_split_holds_out_fonts() -> None:
    from training.render_sources import load_glyphs

    try:
        src = load_glyphs()  # every installed font (~5 s): families need the whole set to split
    except SourceUnavailable as exc:
        pytest.skip(str(exc))
    data = plan_task(src, "glyphs", None, 0.2, 0)
    assert src.groups is not None and src.group_kind == "font family"
    assert not set(src.groups[data.train]) & set(src.groups[data.val])  # no family on both sides
    assert len(set(src.groups[data.val])) >= 1


def _tree(root: Path, task: str, split: str) -> dict[str, str]:
    return {p.name: p.parent.name for p in (root / task / split).rglob("*.png")}


def test_control_same_images_different_labels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sources.LOADERS, "fashion", lambda: _fake("fashion", 10, 10))
    card, _ = multidomain.build_control(tmp_path / "c", max_per_class=4, log=lambda _m: None)
    assert card["base"] == "fashion" and list(card["tasks"]) == ["fine", "coarse", "pairs"]
    assert [card["tasks"][t]["num_classes"] for t in ("fine", "coarse", "pairs")] == [10, 4, 5]
    for split in ("train", "val"):
        fine, coarse, pairs = (_tree(tmp_path / "c", t, split) for t in ("fine", "coarse", "pairs"))
        assert fine.keys() == coarse.keys() == pairs.keys() and fine
        for name, cls in fine.items():
            expected = {"Sandal": "footwear", "Bag": "bag", "Trouser": "dress_or_trousers"}.get(cls)
            assert expected is None or coarse[name] == expected
            if cls == "Sandal":
                assert pairs[name] == "Coat+Sandal"
    assert not _tree(tmp_path / "c", "fine", "train").keys() & _tree(tmp_path / "c", "fine", "val").keys()


def test_control_falls_back_to_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sources.LOADERS, "fashion", _missing)
    monkeypatch.setitem(sources.LOADERS, "mnist", lambda: _fake("mnist", 10, 10))
    card, _ = multidomain.build_control(tmp_path / "c", max_per_class=2, log=lambda _m: None)
    assert card["base"] == "mnist" and "fashion" in card["skipped"]
    assert sorted(p.name for p in (tmp_path / "c" / "coarse" / "train").iterdir()) == ["even", "odd"]
    assert (
        main(["data", "mdb", "--control", "--out", str(tmp_path / "c2"), "--max-per-class", "2", "-q"]) == 0
    )
    assert json.loads((tmp_path / "c2" / "card.json").read_text())["name"] == "mdb-control"


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="needs Debian sources (bash scripts/install_mdb_sources.sh)",
)
def test_real_debian_sources_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training import render_sources

    monkeypatch.setitem(sources.LOADERS, "glyphs", lambda: render_sources.load_glyphs(max_fonts=6))
    card, _ = multidomain.build_multidomain(
        tmp_path / "m", sources=["fashion", "glyphs", "digits"], max_per_class=3, size=24, log=print
    )
    assert card["skipped"] == {}
    assert card["tasks"]["fashion"]["counts"] == {"train": 30, "val": 10}
    assert card["tasks"]["glyphs"]["num_classes"] == 36
    from PIL import Image

    assert Image.open(next((tmp_path / "m" / "glyphs").rglob("*.png"))).size == (24, 24)
