"""An engine that emulates a device (``--emulate-device-ms``): each batch sleeps that long, uses no CPU and
answers uniform logits. For benchmarks of the front (the API processes, the wire, the batcher) on a
machine whose CPUs would otherwise be shared with onnxruntime: with it, throughput against
``--workers`` shows how the front scales (issue 12). Never for serving answers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from contract.manifest import Manifest
from contract.plan import group_rows
from service.engine_types import Call, SegmentRun


class EmulatedEngine:
    """The :class:`service.engine_types.Engine` interface; ``infer`` sleeps ``ms`` per batch."""

    def __init__(self, manifest: Manifest, ms: float):
        self.manifest = manifest
        self.seconds = ms / 1000.0
        self.providers = ["EmulatedDevice"]
        self.ready = False

    def start(self) -> None:
        self.ready = True

    def stop(self) -> None:
        self.ready = False

    def describe(self) -> dict:
        return {"emulated_device_ms": self.seconds * 1000.0}

    def infer(self, x: np.ndarray, tasks: Sequence[str]) -> tuple[list[np.ndarray], list[SegmentRun]]:
        time.sleep(self.seconds)  # the device is busy; the CPU is not
        runs = []
        for seg in self.manifest.segments:
            groups = group_rows([self.manifest.variant_of(t, seg.name) for t in tasks])
            calls = [Call(v, len(r), len({tasks[i] for i in r}), seg.shared) for v, r in groups]
            runs.append(SegmentRun(seg.name, self.seconds / len(self.manifest.segments), calls))
        widths = {t: len(spec.labels) for t, spec in self.manifest.tasks.items()}
        return [np.zeros(widths[t], np.float32) for t in tasks], runs
