"""GPU checks (marker ``gpu``; deselected by default, skipped without CUDA): the engine on the CUDA
provider with IOBinding equals the CPU engine, the server reports the provider it really uses, and
the trainer runs on CUDA with mixed precision. Run: ``pytest -m gpu tests/test_gpu.py``."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from contract.bundle import load_bundle
from tests.serving import png, serve

ort = pytest.importorskip("onnxruntime")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="onnxruntime has no CUDA provider",
    ),
]
TASKS = ["shapes", "digits", "animals", "digits", "shapes", "animals", "animals"]


def _engine(bundle, device: str):
    from service.engine import OrtEngine

    engine = OrtEngine(load_bundle(bundle), device=device, threads=1, warmup_batch_sizes=(1, 4))
    engine.start()
    return engine


def test_cuda_engine_uses_cuda_with_iobinding_and_equals_cpu(tiny_bundle):
    cpu, gpu = _engine(tiny_bundle, "cpu"), _engine(tiny_bundle, "cuda")
    try:
        assert gpu.providers[0] == "CUDAExecutionProvider", gpu.providers
        assert gpu.io_binding
        x = np.random.default_rng(3).normal(size=(len(TASKS), 3, 32, 32)).astype(np.float32)
        a, _ = cpu.infer(x, TASKS)
        b, runs = gpu.infer(x, TASKS)
        assert runs[1].calls[0].tasks == 3  # one trunk batch across the tasks
        for p, q in zip(a, b, strict=True):
            assert np.abs(p - q).max() <= 2e-3 * max(1.0, float(np.abs(p).max()))
        for i, t in enumerate(TASKS):  # a mixed batch equals each row alone, on the device too
            alone, _ = gpu.infer(x[i : i + 1], [t])
            assert np.abs(alone[0] - b[i]).max() <= 1e-3 * max(1.0, float(np.abs(b[i]).max()))
    finally:
        cpu.stop()
        gpu.stop()


def test_server_on_cuda_reports_the_provider_and_answers(tiny_bundle):
    with serve(tiny_bundle, "--device", "cuda", "--log-level", "warning") as (proc, url, _):
        assert "CUDAExecutionProvider" in str(httpx.get(url + "/readyz").json())
        lines = httpx.get(url + "/metrics").text.splitlines()
        info = [ln for ln in lines if ln.startswith("mtserve_model_info{")]
        assert info and 'providers="CUDAExecutionProvider' in info[0], info
        for i, task in enumerate(["digits", "animals", "shapes"]):
            r = httpx.post(f"{url}/predict/{task}", content=png(i), headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_trainer_runs_on_cuda_with_amp_and_exports(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    from test_train_support import make_tree, write_config

    from service.cli import main

    data = make_tree(tmp_path / "data")
    steps = {"steps": 12, "warmup_steps": 2}
    cfg = write_config(tmp_path / "c.yaml", data, device="cuda", amp="bf16", schedule=steps)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "bundle")]) == 0
    assert load_bundle(tmp_path / "bundle").manifest.tasks


# -- shape-stable execution (issue 13): batch buckets, a CUDA graph per (variant, bucket) ---------
BUCKETS = (1, 2, 4, 8)


def _bucketed(bundle, graphs: bool, factory=None):
    from service.engine import OrtEngine

    engine = OrtEngine(
        load_bundle(bundle),
        device="cuda",
        threads=1,
        warmup_batch_sizes=(),
        buckets=BUCKETS,
        cuda_graphs=graphs,
        session_factory=factory,
    )
    engine.start()
    return engine


def _batches():
    rng = np.random.default_rng(11)
    for tasks in (TASKS, ["digits"] * 8, ["shapes"], TASKS * 3):  # mixed, single, one row, > largest bucket
        yield rng.normal(size=(len(tasks), 3, 32, 32)).astype(np.float32), tasks


def _close(a, b, rel: float) -> bool:
    return all(
        np.abs(p - q).max() <= rel * max(1.0, float(np.abs(p).max())) for p, q in zip(a, b, strict=True)
    )


def test_cuda_graphs_on_equal_graphs_off_and_cpu(tiny_bundle):
    from service.engine import OrtEngine

    cpu = OrtEngine(load_bundle(tiny_bundle), threads=1, warmup_batch_sizes=())
    cpu.start()
    on, off = _bucketed(tiny_bundle, True), _bucketed(tiny_bundle, False)
    try:
        assert on.providers[0] == off.providers[0] == "CUDAExecutionProvider"
        for _ in range(2):  # the second pass replays graphs captured with other inputs
            for x, tasks in _batches():
                want, _ = cpu.infer(x, tasks)
                a, _ = on.infer(x, tasks)
                b, _ = off.infer(x, tasks)
                assert _close(want, a, 2e-3) and _close(want, b, 2e-3), tasks
                assert _close(b, a, 1e-4), tasks  # same kernels, captured or not
    finally:
        for e in (cpu, on, off):
            e.stop()


def test_each_cuda_graph_id_only_sees_its_own_shape_and_address(tiny_bundle):
    from tests.test_buckets import Recorder

    rec = Recorder()
    engine = _bucketed(tiny_bundle, True, rec)
    try:
        for x, tasks in _batches():
            engine.infer(x, tasks)
        variants = sum(len(s.variants) for s in engine.manifest.segments)
        assert len(rec.bound) == variants * len(BUCKETS)
        for (sess, gid), seen in rec.bound.items():
            assert len(seen) == 1, (rec.names[sess], gid, seen)
            ((shape, _),) = seen
            assert gid == BUCKETS.index(shape[0]) + 1, (rec.names[sess], gid, shape)
    finally:
        engine.stop()


def test_start_up_captures_every_variant_bucket_and_reports_it(tiny_bundle):
    engine = _bucketed(tiny_bundle, True)
    try:
        d = engine.describe()
        variants = sum(len(s.variants) for s in engine.manifest.segments)
        assert d["ready"] and d["execution"] == "cuda-graphs", d
        assert d["bucket_calls"] == variants * len(BUCKETS), d
        assert d["cuda_graphs_captured"] == d["bucket_calls"], d  # no (variant, bucket) without a graph
        assert d["memory_kind"] == "device" and d["startup_s"] > 0, d
        print("describe:", d)  # gpu_check.log keeps it (start-up time, device memory, fallbacks)
    finally:
        engine.stop()
