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
        # looked up once: per batch only the grouping is left (the metrics' calls), no CPU per row
        self._variants = [
            (seg.name, seg.shared, {t: manifest.variant_of(t, seg.name) for t in manifest.tasks})
            for seg in manifest.segments
        ]
        self._logits = {t: np.zeros(len(spec.labels), np.float32) for t, spec in manifest.tasks.items()}
        for row in self._logits.values():
            row.flags.writeable = False  # one row per task, handed out for each of its rows

    def start(self) -> None:
        self.ready = True

    def stop(self) -> None:
        self.ready = False

    def describe(self) -> dict:
        return {"emulated_device_ms": self.seconds * 1000.0}

    def infer(self, x: np.ndarray, tasks: Sequence[str]) -> tuple[list[np.ndarray], list[SegmentRun]]:
        time.sleep(self.seconds)  # the device is busy; the CPU is not
        runs, seconds = [], self.seconds / len(self._variants)
        for name, shared, variant in self._variants:
            groups = group_rows([variant[t] for t in tasks])
            calls = [Call(v, len(r), len({tasks[i] for i in r}), shared) for v, r in groups]
            runs.append(SegmentRun(name, seconds, calls))
        logits = self._logits
        return [logits[t] for t in tasks], runs
