"""ImageFolder data per task (``ROOT/{train,val}/<class>/*``), decoded with Pillow, timm transforms.

All tasks live in one ``MixedDataset`` addressed by a global index; ``MixedBatchSampler`` draws one
batch from every task per step (the paper's sampler), sharded across DDP ranks like
``DistributedSampler``. A corrupt image is replaced by the next readable one of its task and
reported back (``bad`` column) so the trainer can count it; it never stops training.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from contract.images import to_rgb

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """A data folder that cannot be trained on (one line, names the folder)."""


@dataclass(frozen=True)
class TaskData:
    name: str
    root: Path
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]  # (path, label)
    val: tuple[tuple[str, int], ...]


def _scan_split(task: str, folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    if not folder.is_dir():
        raise DataError(f"task {task!r}: missing folder {folder}")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"task {task!r}: {folder} has no class folders (expected {folder}/<class>/*.png)")
    samples = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (folder / cls).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        samples += [(str(p), label) for p in files]
    if not samples:
        raise DataError(f"task {task!r}: {folder} has no images (extensions {', '.join(EXTENSIONS)})")
    return classes, samples


def load_task(name: str, root: str | Path) -> TaskData:
    """Scan one task's ImageFolder root; clear errors for missing/empty/mismatched folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"task {name!r}: data folder not found: {root}")
    train_classes, train = _scan_split(name, root / "train")
    val_classes, val = _scan_split(name, root / "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"task {name!r}: train/ and val/ classes differ under {root} "
            f"(only in train: {only_train[:5]}, only in val: {only_val[:5]})"
        )
    if len(train_classes) < 2:
        raise DataError(f"task {name!r}: needs at least 2 classes, found {train_classes} under {root}")
    return TaskData(name, root, tuple(train_classes), tuple(train), tuple(val))


def load_image(path: str) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


class MixedDataset:
    """All tasks' samples behind one global index; items are ``(image, label, task_id, bad_index)``."""

    def __init__(self, tasks: Sequence[Sequence[tuple[str, int]]], transform: Callable):
        self.samples = [s for task in tasks for s in task]
        self.task_of = np.concatenate([np.full(len(t), i, dtype=np.int64) for i, t in enumerate(tasks)])
        self.offsets = np.cumsum([0] + [len(t) for t in tasks])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        task = int(self.task_of[index])
        start, size = int(self.offsets[task]), int(self.offsets[task + 1] - self.offsets[task])
        bad = -1
        for attempt in range(min(size, 16)):
            i = start + (index - start + attempt) % size
            try:
                img = load_image(self.samples[i][0])
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
                bad = i if bad < 0 else bad
                continue
            return self.transform(img), self.samples[i][1], task, bad
        raise DataError(f"task {task}: 16 unreadable images in a row from {self.samples[index][0]}")


def _shard(n: int, rank: int, world: int, rng: random.Random | None) -> list[int]:
    """``DistributedSampler``'s split: (shuffled) indices padded to a multiple of world, every world-th."""
    order = list(range(n))
    if rng is not None:
        rng.shuffle(order)
    order += order[: (-n) % world]
    return order[rank::world]


class MixedBatchSampler:
    """Infinite: each batch holds ``batch`` indices from every task, in task order.

    Per task, epoch ``e`` is a permutation seeded by ``(seed, task, e)`` and sharded over ranks, so the
    stream is reproducible and ``start_step`` resumes it exactly.
    """

    def __init__(
        self, sizes: Sequence[int], batch: int, seed: int, rank: int = 0, world: int = 1, start_step: int = 0
    ):
        self.sizes, self.batch, self.seed = list(sizes), batch, seed
        self.rank, self.world, self.start_step = rank, world, start_step

    def _stream(self, task: int) -> Iterator[int]:
        offset = sum(self.sizes[:task])
        per_epoch = -(-self.sizes[task] // self.world)
        skip = self.start_step * self.batch
        epoch, pos = divmod(skip, per_epoch)
        while True:
            rng = random.Random(f"{self.seed}/{task}/{epoch}")
            order = _shard(self.sizes[task], self.rank, self.world, rng)
            for i in order[pos:]:
                yield offset + i
            epoch, pos = epoch + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        streams = [self._stream(t) for t in range(len(self.sizes))]
        while True:
            yield [next(s) for s in streams for _ in range(self.batch)]


def eval_batches(sizes: Sequence[int], batch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Single-task batches over every task's val set, this rank's shard (no padding duplicates)."""
    out, offset = [], 0
    for n in sizes:
        mine = [offset + i for i in range(rank, n, world)]
        out += [mine[i : i + batch] for i in range(0, len(mine), batch)]
        offset += n
    return out


def data_config(template, hw: tuple[int, int], crop_pct: float | None = None) -> dict:
    """timm's data config for the model, overridden by the input size (and crop_pct when given)."""
    from timm.data import resolve_data_config

    args = {"input_size": (3, *hw)} | ({"crop_pct": crop_pct} if crop_pct else {})
    return resolve_data_config(args, model=template)


def transforms(cfg: dict, augment) -> tuple[Callable, Callable]:
    """(train, eval) transforms from timm's ``create_transform`` with light augmentation."""
    from timm.data import create_transform

    common = {k: cfg[k] for k in ("input_size", "interpolation", "mean", "std")}
    train = create_transform(
        **common,
        is_training=True,
        scale=tuple(augment.scale),
        hflip=augment.hflip,
        color_jitter=augment.color_jitter or None,
        auto_augment=None,
    )
    evaluate = create_transform(**common, crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"])
    return train, evaluate


def make_loader(dataset, batch_sampler, workers: int, seed: int, pin: bool):
    """A DataLoader over a batch sampler; persistent workers so each epoch/eval reuses them."""
    import torch
    from torch.utils.data import DataLoader

    extra = {"persistent_workers": True, "prefetch_factor": 4} if workers else {}
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin, generator=gen, **extra
    )
