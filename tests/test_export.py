"""training/export.py: the bundle of DESIGN.md §3, verified against torch."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from conftest import TINY_TASKS, build_tiny_bundle  # noqa: E402

from contract.manifest import Manifest  # noqa: E402
from models.network import MultiTaskNet  # noqa: E402
from service.cli import main  # noqa: E402


def test_manifest_describes_every_file_with_its_hash(tiny_bundle):
    manifest = Manifest.read(tiny_bundle)
    assert [s.name for s in manifest.segments] == ["stem", "trunk", "head"]
    assert set(manifest.tasks) == set(TINY_TASKS)
    assert len(manifest.segments[0].variants) == 3 and manifest.segments[1].shared
    for seg in manifest.segments:
        for variant in seg.variants.values():
            data = (tiny_bundle / variant.file).read_bytes()
            assert hashlib.sha256(data).hexdigest() == variant.sha256
        assert 0 <= manifest.parity[seg.name] <= 1e-4
    for prev, nxt in zip(manifest.segments, manifest.segments[1:], strict=False):
        assert prev.output_shape == nxt.input_shape
    acc = manifest.accounting
    assert acc is not None and 0 < acc.proportion < 0.5 and acc.bytes_held < acc.bytes_independent


def _chain(bundle, manifest: Manifest, task: str, x: np.ndarray) -> np.ndarray:
    for seg in manifest.segments:
        spec = seg.variants[manifest.variant_of(task, seg.name)]
        session = ort.InferenceSession(str(bundle / spec.file), providers=["CPUExecutionProvider"])
        (x,) = session.run(None, {"input": x})
    return x


@pytest.mark.parametrize("batch", [1, 5, 17])
def test_onnx_chain_equals_torch_at_any_batch_size(tiny_bundle, batch):
    torch.manual_seed(0)  # build_tiny_bundle's seed: the same weights
    net = MultiTaskNet("test_resnet", TINY_TASKS, "bottom:1").eval()
    manifest = Manifest.read(tiny_bundle)
    x = torch.randn(batch, 3, 32, 32)
    for task, n_classes in TINY_TASKS.items():
        got = _chain(tiny_bundle, manifest, task, x.numpy())
        with torch.no_grad():
            expected = net.forward_task(x, task).numpy()
        assert got.shape == (batch, n_classes)
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_export_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny_bundle(tmp_path)
    assert (tmp_path / "keep.txt").exists()


def test_export_of_a_run_without_checkpoint_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtserve export: error:") and "\n" not in err and str(run_dir) in err
    assert not (tmp_path / "bundle").exists()


def test_inspect_prints_plan_tasks_and_bytes(tiny_bundle, capsys):
    assert main(["inspect", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    assert "plan bottom:1" in out and "independent models" in out
    for task in TINY_TASKS:
        assert task in out
    assert main(["inspect", str(tiny_bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tiny"
