"""The accuracy check against the fp32 bundle: every task's validation images run through both;
top-1 of each and their top-1 agreement go into the manifest, and a task that loses more than
``max_accuracy_drop`` points refuses the whole bundle."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from contract.errors import UserError
from contract.manifest import TaskAccuracy
from training.quantize_chain import OrtChain
from training.quantize_data import TaskData, batches, images


def evaluate(
    ref: OrtChain, new: OrtChain, tasks: Mapping[str, TaskData], batch: int, tf: Callable
) -> tuple[dict[str, TaskAccuracy], dict[str, float]]:
    """Per task: top-1 of both bundles and their agreement; per segment: max |new - ref|."""
    accuracy: dict[str, TaskAccuracy] = {}
    diff = dict.fromkeys(ref.segments, 0.0)
    for task, data in tasks.items():
        right_ref = right_new = agree = 0
        for part in batches(data.val, batch):
            x = images(part, tf, {})
            labels = np.asarray([label for _, label in part])
            a, b = ref.run(task, x), new.run(task, x)
            for name, ya, yb in zip(ref.segments, a, b, strict=True):
                diff[name] = max(diff[name], float(np.max(np.abs(ya.astype(np.float32) - yb))))
            pa, pb = a[-1].argmax(1), b[-1].argmax(1)
            right_ref += int((pa == labels).sum())
            right_new += int((pb == labels).sum())
            agree += int((pa == pb).sum())
        n = len(data.val)
        top_ref, top_new = 100.0 * right_ref / n, 100.0 * right_new / n
        accuracy[task] = TaskAccuracy(
            images=n,
            top1_fp32=round(top_ref, 3),
            top1_reduced=round(top_new, 3),
            drop=round(top_ref - top_new, 3),
            agreement=round(100.0 * agree / n, 3),
        )
    return accuracy, {k: float(f"{v:.3g}") for k, v in diff.items()}


def say_accuracy(precision: str, accuracy: Mapping[str, TaskAccuracy], say: Callable[[str], None]) -> None:
    """One line per task: top-1 of both bundles, the drop, the agreement."""
    for task, a in accuracy.items():
        say(
            f"  {task:16s} top-1 fp32 {a.top1_fp32:6.2f}%  {precision} {a.top1_reduced:6.2f}%  "
            f"drop {a.drop:+.2f}  agreement {a.agreement:6.2f}%  ({a.images} val images)"
        )


def check_accuracy(precision: str, accuracy: Mapping[str, TaskAccuracy], limit: float) -> None:
    """Raise :class:`UserError` (one line) if a task loses more than ``limit`` points of top-1."""
    worse = {t: a for t, a in accuracy.items() if a.drop > limit}
    if worse:
        parts = [
            f"{t} {a.top1_fp32:.2f}% -> {a.top1_reduced:.2f}% (-{a.drop:.2f} points, {a.images} val images)"
            for t, a in worse.items()
        ]
        raise UserError(
            f"{precision} bundle refused: {'; '.join(parts)} exceeds --max-accuracy-drop {limit:g}; nothing "
            "written (try --calibrate-method entropy or percentile, more --calibration-images, --keep-fp32 "
            "SEGMENT, or --precision fp16)"
        )
