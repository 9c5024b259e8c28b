"""add-task / remove-task on a tiny bundle with a checkpoint: only the new variants train and are
exported, every other file is byte-identical, other tasks' logits are bit-identical on the torch side
and in onnxruntime, the accounting follows, remove-task drops exactly the task's own files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract.bundle import load_bundle, sha256_file
from contract.errors import UserError
from tests.conftest import TINY_INPUT, TINY_TASKS

pytest.importorskip("torch")

NEW_CLASSES = ("red", "green", "blue")


def add_checkpoint(bundle: Path, *, plan: str = "bottom:1", seed: int = 0) -> Path:
    """The torch side (checkpoint.safetensors + config.json) of conftest's tiny bundle: the same
    network, rebuilt from the same seed (checked against the bundle's ONNX files)."""
    import torch
    from safetensors.torch import save_file

    from models.network import MultiTaskNet
    from service.engine import OrtEngine

    torch.manual_seed(seed)
    net = MultiTaskNet("test_resnet", TINY_TASKS, plan).eval()
    labels = {t: [f"{t}_{i}" for i in range(n)] for t, n in TINY_TASKS.items()}
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(bundle / "checkpoint.safetensors"))
    config = {
        "backbone": "test_resnet",
        "timm_kwargs": {},
        "plan": plan,
        "tasks": {t: {"labels": v} for t, v in labels.items()},
        "data_config": {**TINY_INPUT, "input_size": list(TINY_INPUT["input_size"])},
        "accounting": net.accounting().model_dump(),
        "train_config": {"augment": {"scale": [0.8, 1.0], "hflip": 0.0}, "optimizer": {"lr": 0.003}},
    }
    (bundle / "config.json").write_text(json.dumps(config))
    engine = OrtEngine(load_bundle(bundle))
    engine.start()
    x = torch.randn(2, 3, 32, 32)
    for task in TINY_TASKS:
        served, _ = engine.infer(x.numpy(), [task] * 2)
        with torch.no_grad():
            assert np.allclose(np.stack(served), net.forward_task(x, task).numpy(), atol=1e-4), task
    engine.stop()
    return bundle


def build_colors(root: Path, per_class: tuple[int, int] = (24, 8)) -> Path:
    """ImageFolder root/{train,val}/{red,green,blue}: noisy images of one dominant colour."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c, name in enumerate(NEW_CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                img[..., c] += 160
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bundle) -> Path:
    return add_checkpoint(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("add-task") / "v1"))


@pytest.fixture(scope="module")
def colors(tmp_path_factory) -> Path:
    return build_colors(tmp_path_factory.mktemp("colors") / "colors")


def quick(**kw):
    from training.add_task import AddTaskConfig

    base = {"steps": 12, "batch_size": 16, "workers": 0, "eval_interval": 6, "warmup_steps": 2}
    return AddTaskConfig(**(base | kw))


@pytest.fixture(scope="module")
def added(trained, colors, tmp_path_factory):
    from training.add_task import add_task

    out = tmp_path_factory.mktemp("added") / "v2"
    result = add_task(trained, "colors", colors, out, quick(), progress=False, say=lambda *_: None)
    return out, result


def files(bundle: Path) -> dict[str, str]:
    m = load_bundle(bundle).manifest
    return {v.file: v.sha256 for s in m.segments for v in s.variants.values()}


def test_add_task_writes_only_the_new_variants(trained, added):
    out, result = added
    old, new = files(trained), files(out)
    assert set(new) - set(old) == {"segments/stem/colors.onnx", "segments/head/colors.onnx"}
    for f, digest in old.items():  # every other file byte-identical
        assert new[f] == digest == sha256_file(out / f)
    m = load_bundle(out).manifest
    assert list(m.tasks) == [*TINY_TASKS, "colors"]
    assert m.tasks["colors"].labels == sorted(NEW_CLASSES)
    assert m.tasks["colors"].variants == {"stem": "colors", "trunk": "shared", "head": "colors"}
    assert m.version == "1+colors" and m.plan == "bottom:1"
    assert result.others_bit_identical and 0.0 <= result.val["top1"] <= 1.0
    assert result.owned == ["stem", "head"]


def test_add_task_accounting_and_checkpoint_rebuild(trained, added):
    """The new accounting equals the torch network's; the checkpoint + config load as a 4-task net."""
    from training.add_task_network import load_bundle_net

    out, result = added
    m = load_bundle(out).manifest
    net, cfg = load_bundle_net(out, m)
    assert net.task_names == [*TINY_TASKS, "colors"]
    assert net.accounting() == m.accounting
    old = load_bundle(trained).manifest.accounting
    stem, head = (m.segments[0].variants["colors"].params, m.segments[-1].variants["colors"].params)
    assert (
        m.accounting.total_params
        == old.total_params + stem + head
        == result.trainable_params + (old.total_params)
    )
    assert cfg["history"][-1]["action"] == "add-task" and cfg["history"][-1]["task"] == "colors"


def test_add_task_other_tasks_bit_identical_torch_and_onnx(trained, added):
    import torch

    from training.add_task_guard import reference_logits
    from training.add_task_network import load_bundle_net

    out, _ = added
    old_m, new_m = load_bundle(trained).manifest, load_bundle(out).manifest
    old_net, _ = load_bundle_net(trained, old_m)
    new_net, _ = load_bundle_net(out, new_m)
    a = reference_logits(old_net, list(TINY_TASKS), old_m.input.size, seed=7)
    b = reference_logits(new_net, list(TINY_TASKS), old_m.input.size, seed=7)
    assert all(torch.equal(a[t], b[t]) for t in TINY_TASKS)

    from service.engine import OrtEngine

    x = np.random.default_rng(3).standard_normal((5, 3, 32, 32)).astype(np.float32)
    engines = [OrtEngine(load_bundle(p)) for p in (trained, out)]
    for e in engines:
        e.start()
    try:
        for task in TINY_TASKS:
            before, _ = engines[0].infer(x, [task] * 5)
            after, _ = engines[1].infer(x, [task] * 5)
            assert np.stack(before).tobytes() == np.stack(after).tobytes(), task
        logits, _ = engines[1].infer(x[:3], ["colors", "digits", "colors"])
        assert [len(v) for v in logits] == [3, 10, 3]
    finally:
        for e in engines:
            e.stop()


def test_add_task_refusals(trained, colors, tmp_path):
    from training.add_task import add_task

    with pytest.raises(UserError, match="already in"):
        add_task(trained, "digits", colors, tmp_path / "a", quick(), progress=False, say=lambda *_: None)
    with pytest.raises(UserError, match="--own 2"):
        add_task(trained, "c2", colors, tmp_path / "b", quick(own=2), progress=False, say=lambda *_: None)
    with pytest.raises(UserError, match="source bundle"):
        add_task(trained, "c3", colors, trained, quick(), progress=False, say=lambda *_: None)
    bare = tmp_path / "bare"
    shutil.copytree(trained, bare)
    (bare / "checkpoint.safetensors").unlink()
    with pytest.raises(UserError, match="checkpoint"):
        add_task(bare, "c4", colors, tmp_path / "c", quick(), progress=False, say=lambda *_: None)


def test_add_task_own_zero_trains_only_a_head(trained, colors, tmp_path):
    """--own 0: the new task runs an existing task's stem (the probed donor) and owns only a head."""
    from training.add_task import add_task

    out = tmp_path / "v2"
    result = add_task(
        trained, "colors", colors, out, quick(own=0, init="scratch"), progress=False, say=lambda *_: None
    )
    m = load_bundle(out).manifest
    assert set(files(out)) - set(files(trained)) == {"segments/head/colors.onnx"}
    assert m.tasks["colors"].variants["stem"] == result.donor in TINY_TASKS
    assert m.plan.startswith("{")  # an explicit plan: the stem's donor is shared by two tasks


def test_remove_task_round_trip(trained, added, tmp_path):
    from training.add_task_network import load_bundle_net
    from training.remove_task import remove_task

    out, _ = added
    back = tmp_path / "v3"
    summary = remove_task(out, "colors", back, log=lambda *_: None)
    assert sorted(summary["removed_files"]) == ["segments/head/colors.onnx", "segments/stem/colors.onnx"]
    assert files(back) == files(trained)  # the very same files as before the add
    m = load_bundle(back).manifest
    assert list(m.tasks) == list(TINY_TASKS) and m.version == "1+colors-colors"
    assert m.accounting == load_bundle(trained).manifest.accounting
    net, _ = load_bundle_net(back, m)  # the checkpoint lost exactly the removed variants
    assert net.task_names == list(TINY_TASKS)
    with pytest.raises(UserError, match="not in"):
        remove_task(back, "colors", tmp_path / "v4", log=lambda *_: None)


# -- hot add on a running server ------------------------------------------------------------------

TOKEN = "add-task-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def v2_body(seed: int) -> dict:
    x = np.random.default_rng(seed).standard_normal((2, 3, 32, 32)).astype(np.float32)
    return {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }


def test_hot_add_under_load_fails_no_request(trained, added, tmp_path):
    """A real server serves v1; concurrent /predict and /v2 clients run while v2 (v1 + colors) is
    reloaded: every answer 200, the old tasks' answers bit-identical, the new task served and listed
    in /tasks, /v2 and the metrics; the unchanged files' sessions are reused."""
    import asyncio
    import re
    import time

    import httpx

    from tests.serving import png, serve

    out, _ = added
    models = tmp_path / "models"
    shutil.copytree(trained, models / "v1")
    shutil.copytree(out, models / "v2")
    env = {"MTSERVE_ADMIN_TOKEN": TOKEN, "MTSERVE_MAX_WAIT_MS": "2"}
    args = ("--threads", "1", "--max-batch-size", "16")
    results: list[tuple[float, float, str, int, str]] = []
    with serve(models / "v1", *args, env=env, log=tmp_path / "server.log") as (_proc, url, log):

        def answers(client: httpx.Client) -> dict:
            return {
                t: client.post(f"/v2/models/{t}/infer", json=v2_body(7)).json()["outputs"] for t in TINY_TASKS
            }

        with httpx.Client(base_url=url, timeout=30) as client:
            before = answers(client)
        image = png(1)

        async def worker(client: httpx.AsyncClient, w: int, stop: asyncio.Event, tasks: list[str]) -> None:
            i = 0
            while not stop.is_set():
                task = tasks[(w + i) % len(tasks)]
                sent = time.monotonic()
                if i % 2:
                    r = await client.post(f"/v2/models/{task}/infer", json=v2_body(i % 3))
                else:
                    r = await client.post(
                        f"/predict/{task}", content=image, headers={"content-type": "image/png"}
                    )
                version = r.json().get("model_version", "?") if r.status_code == 200 else r.text
                results.append((sent, time.monotonic(), task, r.status_code, version))
                i += 1

        async def scenario() -> httpx.Response:
            stop = asyncio.Event()
            tasks = list(TINY_TASKS)
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                workers = [asyncio.create_task(worker(client, w, stop, tasks)) for w in range(4)]
                await asyncio.sleep(0.5)
                reload = await client.post("/admin/reload", json={"bundle": "v2"}, headers=AUTH)
                tasks.append("colors")  # the workers send the new task too from now on
                await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*workers)
            return reload

        reload = asyncio.run(scenario())
        assert reload.status_code == 200, reload.text
        assert reload.json()["version"] == "1+colors"
        bad = [r for r in results if r[3] != 200]
        assert not bad, bad[:5]
        assert {r[4] for r in results} == {"1", "1+colors"}
        assert any(r[2] == "colors" for r in results)

        with httpx.Client(base_url=url, timeout=30) as client:
            assert answers(client) == before  # bit-identical: the same JSON floats
            listed = [t["name"] for t in client.get("/tasks").json()["tasks"]]
            assert listed == [*TINY_TASKS, "colors"]
            assert client.get("/v2/models/colors").status_code == 200
            assert client.get("/v2/models/colors/ready").status_code == 200
            r = client.post("/v2/models/colors/infer", json=v2_body(0))
            assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [2, 3]
            metrics = client.get("/metrics").text
            assert re.search(r'mtserve_requests_total\{code="200",task="colors"\} [1-9]', metrics)
            assert 'mtserve_request_duration_seconds_count{task="colors"}' in metrics
            # sessions of the unchanged files were reused: only the two new files were loaded
            assert client.get("/readyz").json()["engine"]["sessions_reused"] == 7

            # removing the task is an explicit admin action
            from training.remove_task import remove_task

            remove_task(models / "v2", "colors", models / "v3", log=lambda *_: None)
            refused = client.post("/admin/reload", json={"bundle": "v3"}, headers=AUTH)
            assert refused.status_code == 409 and "allow_remove" in refused.text
            png_header = {"content-type": "image/png"}
            assert client.post("/predict/colors", content=image, headers=png_header).is_success
            done = client.post("/admin/reload", json={"bundle": "v3", "allow_remove": True}, headers=AUTH)
            assert done.status_code == 200, done.text
            gone = client.post("/predict/colors", content=image, headers=png_header)
            assert gone.status_code == 404
            assert [t["name"] for t in client.get("/tasks").json()["tasks"]] == list(TINY_TASKS)
            assert answers(client) == before
        text = log.read_text()
        assert "reload: now serving tiny 1+colors" in text
