"""Reduced-precision bundles (training/quantize.py, service/precision.py): real onnxruntime on the tiny
bundle. int8 and fp16 files are written and recorded, the accuracy check refuses, the CPU refuses
fp16, the server answers from an int8 bundle."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from PIL import Image

from contract.bundle import load_bundle
from contract.errors import BundleError, UserError
from contract.manifest import Manifest, TaskAccuracy
from service.cli import main
from tests.conftest import TINY_TASKS

pytest.importorskip("timm")


def _png(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder roots for the tiny bundle's tasks: ``ROOT/<task>/{train,val}/<label>/*.png``."""
    root = tmp_path_factory.mktemp("qdata")
    rng = np.random.default_rng(0)
    for task, n in TINY_TASKS.items():
        for split, k in (("train", 2), ("val", 2)):
            for c in range(n):
                folder = root / task / split / f"{task}_{c}"
                folder.mkdir(parents=True)
                for i in range(k):
                    _png(rng).save(folder / f"{i}.png")
    return root


def _quantize(src: Path, out: Path, data: Path, *extra: str) -> int:
    return main(["quantize", str(src), "--out", str(out), "--data", str(data), *extra])


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle: Path, data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "tiny-int8"
    assert _quantize(tiny_bundle, out, data, "--max-accuracy-drop", "100", "--threads", "1") == 0
    return out


@pytest.fixture(scope="module")
def fp16_bundle(tiny_bundle: Path, data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "tiny-fp16"
    assert _quantize(tiny_bundle, out, data, "--precision", "fp16", "--max-accuracy-drop", "100") == 0
    return out


def test_int8_files_and_manifest(tiny_bundle: Path, int8_bundle: Path):
    src, m = load_bundle(tiny_bundle).manifest, load_bundle(int8_bundle).manifest  # sha256 verified
    assert m.precisions == {"int8"} and src.precisions == {"fp32"}
    assert m.version == f"{src.version}-int8" and m.tasks == src.tasks
    report = m.reduced_precision
    assert report is not None and report.precision == "int8"
    assert report.method["quant_format"] == "QDQ" and report.method["per_channel"] is True
    assert set(report.tasks) == set(TINY_TASKS)
    for task, acc in report.tasks.items():
        n = TINY_TASKS[task] * 2
        assert acc.images == n and 0 <= acc.agreement <= 100
        assert acc.drop == pytest.approx(acc.top1_fp32 - acc.top1_reduced)
    assert set(report.max_abs_diff) == {s.name for s in m.segments}
    trunk = next(s for s in m.segments if s.name == "trunk")
    path = int8_bundle / trunk.variants["shared"].file
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert path.stat().st_size < 0.5 * (tiny_bundle / trunk.variants["shared"].file).stat().st_size


def test_fp16_files_keep_float32_io(fp16_bundle: Path):
    m = load_bundle(fp16_bundle).manifest
    assert m.precisions == {"fp16"} and m.reduced_precision.precision == "fp16"
    model = onnx.load(str(fp16_bundle / m.segments[1].variants["shared"].file))
    assert {i.data_type for i in model.graph.initializer if i.dims} == {onnx.TensorProto.FLOAT16}
    io_types = [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]]
    assert io_types == [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT]
    assert all(a.agreement > 90 for a in m.reduced_precision.tasks.values())


def test_fp32_manifest_leaves_the_new_fields_out(tiny_bundle: Path, int8_bundle: Path):
    """An fp32 bundle's manifest has no precision fields (servers older than them refuse unknown
    fields) and reads as fp32; a reduced one writes them and reads back equal."""
    text = (tiny_bundle / "manifest.json").read_text()
    assert '"precision"' not in text and "reduced_precision" not in text
    m = Manifest.model_validate(json.loads(text))
    assert m.precisions == {"fp32"} and m.reduced_precision is None
    m8 = Manifest.read(int8_bundle)
    assert (int8_bundle / "manifest.json").read_text().count('"precision": "int8"') == 8  # 7 files + report
    assert Manifest.model_validate(json.loads((int8_bundle / "manifest.json").read_text())) == m8


def test_accuracy_drop_over_the_limit_refuses(tiny_bundle, data, tmp_path, monkeypatch, capsys):
    import training.quantize as q

    def worse(ref, new, tasks, batch, tf):
        acc = {
            t: TaskAccuracy(images=10, top1_fp32=90.0, top1_reduced=88.5, drop=1.5, agreement=95.0)
            for t in tasks
        }
        return acc, {}

    monkeypatch.setattr(q, "_evaluate", worse)
    out = tmp_path / "refused"
    assert _quantize(tiny_bundle, out, data, "--max-accuracy-drop", "1.0") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "int8 bundle refused" in err and "-1.50 points" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, no partial folder
    with pytest.raises(UserError, match="exceeds --max-accuracy-drop 2"):
        q.check_accuracy(
            "int8", {"a": TaskAccuracy(images=1, top1_fp32=100, top1_reduced=97, drop=3, agreement=97)}, 2
        )
    q.check_accuracy(
        "int8", {"a": TaskAccuracy(images=1, top1_fp32=100, top1_reduced=99, drop=1, agreement=99)}, 1
    )


def test_user_errors_are_one_line(tiny_bundle, int8_bundle, data, tmp_path, capsys):
    assert main(["quantize", str(tiny_bundle), "--out", str(tmp_path / "x"), "--data", str(tmp_path)]) == 2
    assert "no data for task(s)" in capsys.readouterr().err
    assert _quantize(int8_bundle, tmp_path / "y", data) == 2
    assert "already reduced" in capsys.readouterr().err


def test_cpu_engine_refuses_fp16(fp16_bundle: Path):
    from service.engine import OrtEngine

    engine = OrtEngine(load_bundle(fp16_bundle), device="cpu", threads=1, warmup_batch_sizes=())
    with pytest.raises(BundleError, match=r"fp16 .*needs the CUDA execution provider.*CPUExecutionProvider"):
        engine.start()


async def test_served_int8_bundle_answers(int8_bundle: Path, tiny_bundle: Path):
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(bundle=str(int8_bundle), max_wait_ms=1, threads=1))
    buf = io.BytesIO()
    _png(np.random.default_rng(1)).save(buf, "PNG")
    async with app.router.lifespan_context(app):
        await app.state.service.wait_ready()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.post(
                "/predict/digits", content=buf.getvalue(), headers={"content-type": "image/png"}
            )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "1-int8"
    assert len(body["predictions"][0]["top_k"]) == 5


def test_bench_precision_quick(tiny_bundle: Path, int8_bundle: Path, tmp_path: Path):
    args = ["bench", "precision", "--demo", str(tiny_bundle), "--demo-int8", str(int8_bundle)]
    args += ["--r50-mt2", str(tmp_path / "absent"), "--quick", "--out", str(tmp_path), "--threads", "1"]
    assert main(args) == 0
    result = json.loads((tmp_path / "precision.json").read_text())
    rows = result["int8"]["demo"]["rows"]
    assert [r["batch_size"] for r in rows] == [1, 32] and all(r["speedup"] > 0 for r in rows)
    assert set(result["int8"]["demo"]["accuracy"]) == set(TINY_TASKS)
    assert "missing" in result["int8"]["r50"]["not_measured"]
    assert result["fp16"]["demo"]["not_measured"].startswith("no GPU")
    assert "avx512_vnni" in result["cpu_flags"] and "not measured" in (tmp_path / "precision.md").read_text()
