"""Bundle verification, the onnxruntime engine on a real tiny bundle, preprocessing vs timm,
settings/CLI, and the rule that service/ never imports torch."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract.bundle import load_bundle
from contract.errors import BundleError
from contract.manifest import InputSpec
from service.preprocess import transform
from service.serve_cli import add_arguments, settings_from
from tests.fakes import fake_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_service_never_imports_torch():
    code = (
        "import sys; import service.app, service.serve_cli, service.engine, service.batcher, "
        "contract.bundle, service.preprocess, service.metrics, service.oip, service.cli; "
        "service.cli.build_parser(); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# -- bundle verification (no onnxruntime needed) ----------------------------------------------
def write_bundle(root: Path, mutate=None) -> Path:
    data = json.loads(fake_manifest().model_dump_json())
    for seg in data["segments"]:
        for vid, spec in seg["variants"].items():
            path = root / spec["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"{seg['name']}/{vid}".encode())
            import hashlib

            spec["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    if mutate:
        mutate(data, root)
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def test_valid_fake_bundle_loads(tmp_path):
    b = load_bundle(write_bundle(tmp_path))
    assert b.tasks == ["digits", "animals", "shapes"]


def _edit_file(d, root):
    (root / "segments/trunk/shared.onnx").write_bytes(b"tampered")


def _unchain(d, root):
    d["segments"][1]["input_shape"] = [8, 2, 2]


@pytest.mark.parametrize(
    ("mutate", "names"),
    [
        (lambda d, r: d.pop("tasks"), ["manifest.json", "tasks"]),
        (lambda d, r: d["input"].update(size=[3, 32]), ["manifest.json", "input.size"]),
        (
            lambda d, r: d["tasks"]["digits"]["variants"].update(stem="nope"),
            ["manifest.json", "tasks.digits"],
        ),
        (_edit_file, ["segments/trunk/shared.onnx", "sha256"]),
        (lambda d, r: (r / "segments/head/shapes.onnx").unlink(), ["segments/head/shapes.onnx", "file"]),
        (_unchain, ["manifest.json", "segments[0].output_shape", "segments[1].input_shape"]),
        (
            lambda d, r: d["segments"][0].update(input_shape=[3, 16, 16]),
            ["segments[0].input_shape", "input.size"],
        ),
        (
            lambda d, r: d["segments"][0]["variants"]["digits"].update(file="../x.onnx"),
            ["outside the bundle"],
        ),
    ],
    ids=["schema", "field", "task variant", "sha256", "missing file", "unchained", "input size", "traversal"],
)
def test_bad_bundles_are_refused_naming_file_and_field(tmp_path, mutate, names):
    write_bundle(tmp_path, mutate)
    with pytest.raises(BundleError) as exc:
        load_bundle(tmp_path)
    for name in names:
        assert name in str(exc.value), str(exc.value)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match=r"manifest\.json"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)


# -- the onnxruntime engine on the real tiny bundle --------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_bundle):
    from service.engine import OrtEngine

    e = OrtEngine(load_bundle(tiny_bundle), threads=1, warmup_batch_sizes=(1, 4))
    e.start()
    return e


def test_engine_mixed_batch_equals_rows_alone(engine):
    tasks = ["digits", "animals", "digits", "shapes", "animals", "shapes", "digits"]
    x = np.random.default_rng(0).normal(size=(len(tasks), 3, 32, 32)).astype(np.float32)
    logits, runs = engine.infer(x, tasks)
    assert [r.segment for r in runs] == ["stem", "trunk", "head"]
    (trunk_call,) = runs[1].calls
    assert trunk_call.rows == 7 and trunk_call.tasks == 3 and trunk_call.shared
    assert [c.rows for c in runs[0].calls] == [3, 2, 2]
    for i, t in enumerate(tasks):
        alone, _ = engine.infer(x[i : i + 1], [t])
        assert logits[i].shape == (4 if t == "shapes" else 10,)
        assert np.abs(alone[0] - logits[i]).max() <= 1e-5


def test_engine_io_binding_path_equals_host_path(tiny_bundle, engine):
    """The IOBinding path (CUDA's, with pointer slices into one buffer) checked on the CPU."""
    from service.engine import OrtEngine

    bound = OrtEngine(load_bundle(tiny_bundle), threads=1, warmup_batch_sizes=(), io_binding=True)
    bound.start()
    tasks = ["shapes", "digits", "animals", "digits", "shapes"]
    x = np.random.default_rng(1).normal(size=(5, 3, 32, 32)).astype(np.float32)
    a, _ = engine.infer(x, tasks)
    b, _ = bound.infer(x, tasks)
    assert all(np.abs(p - q).max() <= 1e-5 for p, q in zip(a, b, strict=True))
    assert engine.providers == ["CPUExecutionProvider"]


def test_engine_refuses_onnx_that_contradicts_the_manifest(tiny_bundle, tmp_path):
    from service.engine import OrtEngine

    root = tmp_path / "b"
    shutil.copytree(tiny_bundle, root)
    data = json.loads((root / "manifest.json").read_text())
    data["tasks"]["shapes"]["labels"].append("extra")  # 5 labels, the head outputs 4
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"shapes\.onnx.*tasks\.shapes\.labels"):
        OrtEngine(load_bundle(root), warmup_batch_sizes=()).start()


# -- preprocessing = timm's eval transform ---------------------------------------------------
SPECS = [
    dict(size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear"),
    dict(size=(3, 32, 32), crop_pct=0.875, interpolation="bicubic"),
    dict(size=(3, 24, 40), crop_pct=0.9, interpolation="bilinear"),
    dict(size=(3, 32, 32), crop_pct=0.95, interpolation="bicubic", crop_mode="squash"),
    dict(size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear", crop_mode="border"),
]


@pytest.mark.parametrize("spec", SPECS, ids=[str(i) for i in range(len(SPECS))])
@pytest.mark.parametrize("wh", [(57, 41), (20, 90), (32, 32), (16, 12)])
def test_preprocess_matches_timm_eval_transform(spec, wh):
    timm_data = pytest.importorskip("timm.data")
    spec = InputSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), **spec)
    img = Image.fromarray(np.random.default_rng(sum(wh)).integers(0, 255, (wh[1], wh[0], 3), dtype=np.uint8))
    t = timm_data.create_transform(
        input_size=spec.size,
        interpolation=spec.interpolation,
        mean=spec.mean,
        std=spec.std,
        crop_pct=spec.crop_pct,
        crop_mode=spec.crop_mode,
    )
    want = t(img).numpy()
    got = transform(img, spec)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5


# -- settings and the CLI -------------------------------------------------------------------
def test_flags_override_env_which_override_defaults(monkeypatch):
    import argparse

    monkeypatch.setenv("MTSERVE_BUNDLE", "/b")
    monkeypatch.setenv("MTSERVE_MAX_WAIT_MS", "7")
    monkeypatch.setenv("MTSERVE_PORT", "9000")
    p = argparse.ArgumentParser()
    add_arguments(p)
    s = settings_from(p.parse_args(["--port", "8123", "--device", "cuda", "--batching", "per-task"]))
    assert (str(s.bundle), s.port, s.max_wait_ms, s.device, s.batching) == (
        "/b",
        8123,
        7.0,
        "cuda",
        "per-task",
    )
    assert s.max_batch_size == 32 and s.intra_op_threads() >= 1


def test_settings_refuse_a_queue_smaller_than_a_request():
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="queue_size"):
        Settings(bundle="b", queue_size=8, max_images_per_request=16)


def test_serve_refuses_a_bad_bundle_with_one_line(tmp_path):
    write_bundle(tmp_path, _edit_file)
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", str(tmp_path), "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "shared.onnx" in r.stderr and "sha256" in r.stderr


def test_serve_exits_1_when_onnxruntime_cannot_load_a_file(tmp_path):
    """sha256 matches but the file is no ONNX model: the engine fails in the background, the
    server stops on its own with exit code 1 and a message naming the file."""
    write_bundle(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", str(tmp_path), "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    assert "onnxruntime cannot load" in r.stderr and ".onnx" in r.stderr


def test_decode_guard_against_huge_images():
    from contract.errors import PayloadTooLarge
    from service.preprocess import decode

    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, "PNG")
    with pytest.raises(PayloadTooLarge):
        decode(buf.getvalue(), max_pixels=1_000_000)


async def test_one_small_image_is_decoded_on_the_loop_and_big_ones_in_the_pool():
    """Same tensor either way; the pool only sees several images, a large body, or many pixels in a
    small body (a flat PNG of 512x512 compresses to a few hundred bytes: it must not stall the loop)."""
    from concurrent.futures import ThreadPoolExecutor

    from service.preprocess import LOOP_MAX_BYTES, Preprocessor, load_image

    class CountingPool(ThreadPoolExecutor):
        submitted = 0

        def submit(self, *a, **kw):
            CountingPool.submitted += 1
            return super().submit(*a, **kw)

    def png(w: int, h: int, noise: bool = False) -> bytes:
        arr = (
            np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8)
            if noise
            else np.zeros((h, w, 3), np.uint8)
        )
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        return buf.getvalue()

    spec = InputSpec(size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with CountingPool(1) as pool:
        pre = Preprocessor(spec, pool, 40_000_000)
        small, flat_big, noisy = png(28, 28, noise=True), png(512, 512), png(128, 128, noise=True)
        assert len(small) <= LOOP_MAX_BYTES and len(flat_big) <= LOOP_MAX_BYTES < len(noisy)
        x = await pre([small])
        assert CountingPool.submitted == 0
        np.testing.assert_array_equal(x[0], load_image(small, spec, 40_000_000))
        for blobs, more in (([flat_big], 1), ([noisy], 1), ([small, small], 2)):
            before = CountingPool.submitted
            y = await pre(blobs)
            assert CountingPool.submitted - before == more and y.shape[0] == len(blobs)


def test_gc_is_settled_for_a_server_after_start_up():
    """Start-up's objects frozen; the youngest generation collected past the requests' working set."""
    import gc

    from service.gc_tuning import GEN0_THRESHOLD, settle_after_start_up

    before = gc.get_threshold()
    keep = [[i] for i in range(1000)]  # objects start-up built
    try:
        settle_after_start_up()
        assert gc.get_threshold() == (max(before[0], GEN0_THRESHOLD), *before[1:])
        assert gc.get_freeze_count() >= len(keep)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
