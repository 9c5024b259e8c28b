"""The multi-domain benchmark (issue 6): one task per image domain, each with its own
labels; and its control, tasks that share one input domain and differ only in labels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from contract.errors import UserError
from training.demo_data import TaskData, build, build_sources, cap_per_class, split_indices, task_seed
from training.sources import FASHION_CLASSES, Source, SourceUnavailable, load

# issue 15: `digits` (sklearn 8x8, 97-98 % for every plan) is out; `greek` (lowercase Greek
# letters, held out by font family) is the seventh domain. `digits` stays a source (--sources).
MDB_SOURCES = ("fashion", "mnist", "animals", "glyphs", "icons", "emoji", "greek")
MDB_DESCRIPTION = (
    "Multi-domain benchmark: every task is its own image domain with its own labels "
    "(clothes, handwritten digits, animal silhouettes, font glyphs with held-out font families, "
    "icon categories with held-out icon names, emoji groups with held-out base emoji, "
    "Greek letters with held-out font families)."
)


def build_multidomain(
    out: Path,
    *,
    sources: Sequence[str] = MDB_SOURCES,
    size: int = 32,
    max_per_class: int | None = 400,
    val_fraction: float = 0.2,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[dict, bool]:
    """Build the benchmark; missing sources are skipped with one line each."""
    if not sources:
        raise UserError("at least one source is required")
    return build_sources(
        out, list(dict.fromkeys(sources)), name="mdb", command="mtserve data mdb",
        description=MDB_DESCRIPTION,
        size=size, max_per_class=max_per_class, val_fraction=val_fraction, seed=seed, force=force,
        skip_missing=True, log=log,
    )  # fmt: skip


# --------------------------------------------------------------------- control

# base source -> {task: (class names, fine label -> class index)}
CONTROL_TASKS: dict[str, dict[str, tuple[tuple[str, ...], tuple[int, ...]]]] = {
    "fashion": {
        "fine": (FASHION_CLASSES, tuple(range(10))),
        # upper body: T-shirt, Pullover, Coat, Shirt; dress & trousers; footwear; bag
        "coarse": (("upper body", "dress or trousers", "footwear", "bag"), (0, 1, 0, 1, 0, 2, 0, 2, 3, 2)),
        "pairs": (tuple(f"{FASHION_CLASSES[2 * i]}+{FASHION_CLASSES[2 * i + 1]}" for i in range(5)),
                  tuple(i // 2 for i in range(10))),
    },
    "mnist": {
        "fine": (tuple(str(i) for i in range(10)), tuple(range(10))),
        "coarse": (("even", "odd"), tuple(i % 2 for i in range(10))),
        "pairs": (tuple(f"{2 * i}+{2 * i + 1}" for i in range(5)), tuple(i // 2 for i in range(10))),
    },
}  # fmt: skip


def control_tasks(
    source: Source, max_per_class: int | None, val_fraction: float, seed: int
) -> list[TaskData]:
    """The control tasks of ``source``: ONE split and the same images for every task,
    relabelled per task (no image is in one task's train and another's val)."""
    s = task_seed(seed, f"control-{source.name}")
    train, val = split_indices(source.labels, None, val_fraction, s)
    val_cap = int(np.ceil(max_per_class * val_fraction / (1 - val_fraction))) if max_per_class else None
    train = cap_per_class(train, source.labels, max_per_class, s + 1)
    val = cap_per_class(val, source.labels, val_cap, s + 2)
    tasks = []
    for task, (classes, mapping) in CONTROL_TASKS[source.name].items():
        labels = np.asarray(mapping, np.int64)[source.labels]
        how = f"stratified random on the 10 {source.name} classes; same images in every task"
        tasks.append(TaskData(task, source, train, val, labels, classes, how))
    return tasks


def build_control(
    out: Path,
    *,
    base: str | None = None,
    size: int = 32,
    max_per_class: int | None = 400,
    val_fraction: float = 0.2,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[dict, bool]:
    """Control set from one domain (Fashion-MNIST, else MNIST): tasks ``fine`` (10
    classes), ``coarse`` (a coarse grouping) and ``pairs`` (an arbitrary pairing)."""
    candidates = [base] if base else list(CONTROL_TASKS)
    for name in candidates:
        if name not in CONTROL_TASKS:
            raise UserError(f"unknown control base {name!r}; known: {', '.join(CONTROL_TASKS)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val fraction must be in (0, 1), got {val_fraction}")
    params = {"name": "mdb-control", "command": "mtserve data mdb-control", "size": size, "seed": seed,
              "val_fraction": val_fraction, "max_per_class": max_per_class, "sources": candidates,
              "description": "Control for the multi-domain benchmark: tasks share ONE input domain "
              "and the same images, and differ only in their labels."}  # fmt: skip

    def make() -> tuple[list[TaskData], dict]:
        skipped: dict[str, str] = {}
        for name in candidates:
            try:
                source = load(name)
            except SourceUnavailable as exc:
                skipped[name] = str(exc)
                log(f"skipping {name}: {exc}")
                continue
            return control_tasks(source, max_per_class, val_fraction, seed), {
                "skipped": skipped,
                "base": name,
            }
        return [], {"skipped": skipped}

    return build(Path(out), params, make, force)
