"""A fake engine with the OrtEngine interface: API and batcher tests need no onnxruntime.

Logits are a deterministic function of each row and its task, so a row's answer does not depend
on the batch it rode in; every call is recorded (the tasks of each batch) for the assertions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

from contract.manifest import Manifest
from contract.plan import group_rows
from service.engine_types import Call, SegmentRun

TASKS = {"digits": 10, "animals": 10, "shapes": 4}
SIZE = (3, 32, 32)


def fake_manifest(tasks: dict[str, int] | None = None, size: tuple[int, int, int] = SIZE) -> Manifest:
    """A bottom:1-shaped manifest (stem per task, shared trunk, head per task); files unused."""
    tasks = tasks or TASKS
    sha = "0" * 64

    def variants(seg: str, names: Sequence[str]) -> dict:
        return {v: {"file": f"segments/{seg}/{v}.onnx", "sha256": sha, "params": 10} for v in names}

    return Manifest.model_validate(
        {
            "name": "fake",
            "version": "7",
            "created_at": "2026-01-01T00:00:00Z",
            "plan": "bottom:1",
            "input": {"size": size, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)},
            "segments": [
                {
                    "name": "stem",
                    "input_shape": size,
                    "output_shape": (8, 4, 4),
                    "variants": variants("stem", tasks),
                },
                {
                    "name": "trunk",
                    "input_shape": (8, 4, 4),
                    "output_shape": (16,),
                    "variants": variants("trunk", ["shared"]),
                },
                {
                    "name": "head",
                    "input_shape": (16,),
                    "output_shape": (-1,),
                    "variants": variants("head", tasks),
                },
            ],
            "tasks": {
                t: {
                    "labels": [f"{t}_{i}" for i in range(n)],
                    "variants": {"stem": t, "trunk": "shared", "head": t},
                }
                for t, n in tasks.items()
            },
        }
    )


def fake_logits(row: np.ndarray, task: str, n: int) -> np.ndarray:
    offset = sum(map(ord, task)) % 7
    return (np.arange(n, dtype=np.float32) * float(row.mean()) + offset).astype(np.float32)


class FakeEngine:
    """``infer`` blocks while ``gate`` is clear and sleeps ``delay`` s per call."""

    def __init__(self, manifest: Manifest | None = None, delay: float = 0.0, fail_start: str | None = None):
        self.manifest = manifest or fake_manifest()
        self.providers = ["FakeExecutionProvider"]
        self.ready = False
        self.delay = delay
        self.fail_start = fail_start
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[list[str]] = []
        self.rows_seen: list[np.ndarray] = []
        self.fail_next = False

    def start(self) -> None:
        if self.fail_start:
            raise RuntimeError(self.fail_start)
        self.ready = True

    def stop(self) -> None:
        self.ready = False

    def infer(self, x: np.ndarray, tasks: Sequence[str]) -> tuple[list[np.ndarray], list[SegmentRun]]:
        assert self.gate.wait(timeout=30), "fake engine gate never opened"
        if self.delay:
            time.sleep(self.delay)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("engine failure")
        assert x.shape == (len(tasks), *self.manifest.input.size), x.shape
        self.calls.append(list(tasks))
        self.rows_seen.append(x.copy())
        runs = []
        for seg in self.manifest.segments:
            groups = group_rows([self.manifest.variant_of(t, seg.name) for t in tasks])
            calls = [Call(v, len(r), len({tasks[i] for i in r}), seg.shared) for v, r in groups]
            runs.append(SegmentRun(seg.name, 1e-4, calls))
        logits = [fake_logits(x[i], t, len(self.manifest.tasks[t].labels)) for i, t in enumerate(tasks)]
        return logits, runs
