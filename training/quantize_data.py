"""The images ``mtserve quantize`` reads: each task's ImageFolder root, its calibration sample (train
split) and its evaluation sample (val split), through the trainer's eval transform."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.errors import UserError
from contract.manifest import Manifest
from training.quantize_options import QuantizeOptions

CONFIG = "config.json"  # the training run's config, copied into the bundle by the exporter


@dataclass
class TaskData:
    name: str
    calibration: list[tuple[str, int]]
    val: list[tuple[str, int]]
    cache: dict[str, np.ndarray] = field(default_factory=dict)


def _config_roots(bundle_root: Path, manifest: Manifest) -> dict[str, Path]:
    """task -> data root, as the training run's ``config.json`` names them (none without one)."""
    roots: dict[str, Path] = {}
    config = bundle_root / CONFIG
    if config.is_file():
        import json

        train = json.loads(config.read_text()).get("train_config") or {}
        for task, spec in (train.get("tasks") or {}).items():
            if task in manifest.tasks and isinstance(spec, dict) and spec.get("root"):
                roots[task] = Path(spec["root"])
    return roots


def resolve_data(bundle_root: Path, manifest: Manifest, data: Sequence[str] = ()) -> dict[str, Path]:
    """task -> ImageFolder root (``train/`` and ``val/``).

    ``data``: ``TASK=ROOT`` entries, or one ``ROOT`` holding a folder per task; what they leave out
    comes from the training run's config (``config.json``, copied into the bundle by the exporter).
    """
    roots = _config_roots(bundle_root, manifest)
    for entry in data:
        task, sep, root = entry.partition("=")
        if sep:
            if task not in manifest.tasks:
                raise UserError(
                    f"--data {entry}: the bundle has no task {task!r} (tasks: {list(manifest.tasks)})"
                )
            roots[task] = Path(root)
        else:
            for t in manifest.tasks:
                if (Path(entry) / t).is_dir():
                    roots[t] = Path(entry) / t
    missing = [t for t in manifest.tasks if t not in roots]
    if missing:
        raise UserError(
            f"no data for task(s) {missing}: pass --data TASK=ROOT (an ImageFolder root with train/ and "
            f"val/) or --data ROOT (a folder per task); a bundle exported from a run names its data "
            f"in {CONFIG}"
        )
    return roots


def _sample(rng: np.random.Generator, items: Sequence, n: int | None) -> list:
    items = list(items)
    if n is None or n >= len(items):
        return items
    return [items[i] for i in sorted(rng.choice(len(items), n, replace=False))]


def load_tasks(
    manifest: Manifest, roots: Mapping[str, Path], options: QuantizeOptions
) -> dict[str, TaskData]:
    """Each task's calibration and evaluation samples; its class folders must be the bundle's labels."""
    from training.imagefolder import load_task

    rng = np.random.default_rng(options.seed)
    out = {}
    for task, root in roots.items():
        data = load_task(task, root)
        labels = list(manifest.tasks[task].labels)
        if list(data.classes) != labels:
            raise UserError(
                f"task {task!r}: the class folders under {root} {list(data.classes)[:6]} are not the "
                f"bundle's "
                f"labels {labels[:6]} (same names, same order)"
            )
        calibration = _sample(rng, data.train, options.calibration_images)
        out[task] = TaskData(task, calibration, _sample(rng, data.val, options.max_eval_images))
    return out


def eval_transform(manifest: Manifest) -> Callable:
    """timm's eval transform for the manifest's input spec: the trainer's validation, and what
    service/preprocess.py reproduces without torch."""
    from timm.data import create_transform

    spec = manifest.input
    return create_transform(
        input_size=tuple(spec.size),
        interpolation=spec.interpolation,
        mean=tuple(spec.mean),
        std=tuple(spec.std),
        crop_pct=spec.crop_pct,
        crop_mode=spec.crop_mode,
    )


def images(items: Sequence[tuple[str, int]], transform: Callable, cache: dict[str, np.ndarray]) -> np.ndarray:
    """One float32 batch of ``items``' images, each transformed once (``cache``: path -> array)."""
    from training.imagefolder import load_image

    rows = []
    for path, _ in items:
        if path not in cache:
            cache[path] = transform(load_image(path)).numpy()
        rows.append(cache[path])
    return np.stack(rows).astype(np.float32, copy=False)


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
