"""The emulated device (``--emulate-device-ms``): what the batcher and the metrics get from it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from service.emulated_engine import EmulatedEngine
from tests.fakes import fake_manifest


def test_logits_per_row_of_its_tasks_width_and_the_calls_each_segment_made():
    engine = EmulatedEngine(fake_manifest({"a": 3, "b": 5}), ms=0.0)
    tasks = ["a", "b", "a", "a"]
    logits, runs = engine.infer(np.zeros((4, 3, 8, 8), np.float32), tasks)
    assert [len(row) for row in logits] == [3, 5, 3, 3]
    assert all(not row.any() and not row.flags.writeable for row in logits)  # shared rows: read-only
    calls = {run.segment: [(c.variant, c.rows, c.tasks, c.shared) for c in run.calls] for run in runs}
    assert calls == {
        "stem": [("a", 3, 1, False), ("b", 1, 1, False)],
        "trunk": [("shared", 4, 2, True)],
        "head": [("a", 3, 1, False), ("b", 1, 1, False)],
    }


def test_each_batch_takes_the_device_time_and_splits_it_over_the_segments():
    engine = EmulatedEngine(fake_manifest(), ms=30.0)
    t0 = time.perf_counter()
    _, runs = engine.infer(np.zeros((1, 3, 8, 8), np.float32), ["digits"])
    assert time.perf_counter() - t0 >= 0.03
    assert sum(run.seconds for run in runs) == pytest.approx(0.03)
