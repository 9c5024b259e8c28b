"""Per-variant calibration inputs for INT8: a (segment, variant) file sees what it sees in serving,
the train images of the tasks that use it (a task's stem on that task's, a shared trunk on a mix of
all its tasks), fed through the fp32 segments before it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from training.quantize_chain import OrtChain
from training.quantize_data import TaskData, batches, images
from training.quantize_options import QuantizeOptions


@dataclass(frozen=True)
class Reference:
    """The fp32 side of a run: sessions of the source bundle, the tasks' images, the eval transform."""

    chain: OrtChain
    tasks: Mapping[str, TaskData]
    tf: Callable


class CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over a generator of input batches."""

    def __init__(self, name: str, batches: Iterator[np.ndarray]):
        self.name, self._batches, self.rows = name, batches, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._batches, None)
        if x is None:
            return None
        self.rows += len(x)
        return {self.name: x}

    def rewind(self) -> None:  # part of the protocol; each variant gets a fresh reader
        pass


def calibration_batches(
    chain: OrtChain,
    index: int,
    users: Sequence[str],
    tasks: Mapping[str, TaskData],
    n: int,
    batch: int,
    tf: Callable,
) -> Iterator[np.ndarray]:
    """Inputs of segment ``index`` for the tasks in ``users``, ``n`` images in all, split evenly."""
    share = math.ceil(n / len(users))
    for task in users:
        items = tasks[task].calibration[:share]
        for part in batches(items, batch):
            x = images(part, tf, tasks[task].cache)
            yield chain.run(task, x, 0, index)[-1] if index else x


def users_of(chain: OrtChain, segment: str, variant: str) -> list[str]:
    """The tasks whose path runs through ``variant`` of ``segment``."""
    return [t for t, ts in chain.bundle.manifest.tasks.items() if ts.variants[segment] == variant]


def calibration_reader(
    ref: Reference, index: int, segment: str, variant: str, options: QuantizeOptions
) -> CalibrationReader:
    """A fresh reader of the inputs of ``variant`` of segment ``index`` (named ``segment``)."""
    users = users_of(ref.chain, segment, variant)
    batches = calibration_batches(
        ref.chain, index, users, ref.tasks, options.calibration_images, options.batch_size, ref.tf
    )
    return CalibrationReader(ref.chain.input_name(segment, variant), batches)
