"""The engine's CPU memory: one onnxruntime arena shared by every session of the process."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")


def test_engines_sharing_one_arena_answer_like_engines_with_their_own(tiny_bundle):
    """Two engines in one process (a bundle and its reload) share the arena; both answer exactly what
    an engine with per-session arenas answers, at several batch sizes and task mixes."""
    from contract.bundle import load_bundle
    from service.engine import OrtEngine

    bundle = load_bundle(tiny_bundle)
    own = OrtEngine(bundle, threads=1, warmup_batch_sizes=(1, 4), shared_cpu_arena=False)
    shared = [OrtEngine(bundle, threads=1, warmup_batch_sizes=(1, 4)) for _ in range(2)]
    for e in (own, *shared):
        e.start()
    tasks = list(bundle.manifest.tasks)
    rng = np.random.default_rng(0)
    for n in (1, 3, 8, 17):
        x = rng.normal(size=(n, *bundle.manifest.input.size)).astype(np.float32)
        mix = [tasks[i % len(tasks)] for i in range(n)]
        want = own.infer(x, mix)[0]
        for e in shared:
            got = e.infer(x, mix)[0]
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for e in (own, *shared):
        e.stop()
