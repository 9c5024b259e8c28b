"""Trainer loop: loss falls, run files, resume, load_run round trip, pretrained weights, 2-process DDP."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_support import TASKS, make_tree, write_config

from service.cli import main

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data):
    """One short training run shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = write_config(tmp / "c.yaml", data, schedule={"steps": 24, "warmup_steps": 2}, eval_interval=12)
    assert main(["train", "--config", str(cfg), "--out", str(tmp / "run"), "--no-progress"]) == 0
    return tmp / "run"


def _rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_training_writes_run_files_and_loss_falls(run_dir, capsys):
    for name in ("best.safetensors", "last.safetensors", "config.json", "metrics.csv", "curves.png"):
        assert (run_dir / name).is_file(), name
    rows = _rows(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(2, 25, 2))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert rows[-1]["val_top1_alpha"] and rows[-1]["val_top5_beta"] and float(rows[-1]["images_per_s"]) > 0
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["backbone"] == "test_resnet" and cfg["plan"] == "bottom:2" and cfg["step"] == 24
    assert cfg["tasks"]["beta"]["labels"] == [f"class{i}" for i in range(5)]
    assert cfg["data_config"]["input_size"] == [3, 16, 16] and cfg["data_config"]["crop_pct"] == 1.0
    assert cfg["best"]["step"] in (12, 24) and set(cfg["best"]["val"]) == set(TASKS)
    assert cfg["train_config"]["batch_per_task"] == 6


def test_load_run_round_trips_exactly(run_dir, data):
    from training.config import AugmentConfig
    from training.imagefolder import MixedDataset, load_task, transforms
    from training.run_files import load_run

    net, info = load_run(run_dir, "last")
    assert info.step == 24 and info.labels["alpha"] == ("class0", "class1", "class2")
    again, _ = load_run(run_dir, "last")
    x = torch.randn(5, 3, 16, 16)
    ids = [0, 1, 0, 1, 1]
    assert torch.equal(net(x, ids), again(x, ids))
    # the weights are the trained ones: val accuracy matches what training reported
    cfg = json.loads((run_dir / "config.json").read_text())
    _, tf = transforms(info.data_config, AugmentConfig())
    task = load_task("beta", data / "beta")
    ds = MixedDataset([task.val], tf)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor([ds[i][1] for i in range(len(ds))])
    acc = (net.forward_task(xs, "beta").argmax(1) == ys).float().mean().item()
    row = next(r for r in _rows(run_dir) if r["step"] == "24")
    assert acc == pytest.approx(float(row["val_top1_beta"]), abs=1e-3)
    _, best_info = load_run(run_dir)
    assert best_info.step == cfg["best"]["step"]


def test_load_run_without_checkpoint_names_the_dir(tmp_path):
    from training.run_files import load_run

    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_run(tmp_path)


def test_resume_continues_from_the_saved_step(tmp_path, data, capsys):
    cfg = write_config(tmp_path / "c.yaml", data, schedule={"steps": 12, "warmup_steps": 2})
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--max-steps", "6", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["step"] == 6
    code = main(["train", "--config", str(cfg), "--out", str(out), "--no-progress"])
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert [int(r["step"]) for r in _rows(out)] == list(range(2, 13, 2))
    state = json.loads((out / "state.json").read_text())
    assert state["progress"]["step"] == 12 and state["scheduler"]["last_epoch"] == 12


def test_pretrained_weights_load_and_mismatch_is_clear(tmp_path, data, capsys):
    import timm
    from safetensors.torch import save_file

    from training.config import load_config
    from training.imagefolder import load_task
    from training.run_setup import build_run

    src = timm.create_model("test_resnet", num_classes=7)
    weights = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(weights, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": weights}, tmp_path / "w.pth")
    cfg = load_config(write_config(tmp_path / "c.yaml", data))
    tasks = [load_task(n, t.root) for n, t in cfg.tasks.items()]
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        net = build_run(cfg, tasks, pretrained=path).net
        for task in TASKS:  # every stem variant starts from the pretrained stem
            conv = net.variant_module("stem", task)[0][0][0]
            assert torch.equal(conv.weight, src.conv1[0].weight)
    bad = {k: v for k, v in weights.items() if not k.startswith("layer4")} | {"extra.weight": torch.ones(1)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    cfg_path = write_config(tmp_path / "c.yaml", data)
    args = ["train", "--config", str(cfg_path), "--out", str(tmp_path / "r"), "--pretrained"]
    assert main([*args, str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "layer4" in err and "do not fit backbone" in err  # timm ignores extra keys
    assert main([*args, str(tmp_path / "none.pth")]) == 2
    assert "pretrained weights not found" in capsys.readouterr().err


# `mtserve train` (service.cli.main) under torchrun, each rank then dumping the weights it holds
DDP_DUMP = """
import os, sys
from safetensors.torch import save_file
import training.trainer as trainer
from service.cli import main

held = {}
init = trainer._Session.__init__
def capture(self, *args, **kwargs):
    init(self, *args, **kwargs)
    held["net"] = self.net
trainer._Session.__init__ = capture
code = main(sys.argv[1:])
state = {k: v.detach().clone().contiguous() for k, v in held["net"].state_dict().items()}
save_file(state, os.path.join(os.environ["DUMP_DIR"], f"rank{os.environ['RANK']}.safetensors"))
sys.exit(code)
"""


def test_ddp_two_cpu_processes(tmp_path, data):
    """2 gloo ranks on the CPU: one run directory, rank 0 alone writes, and both ranks end with
    bit-identical parameters (BatchNorm running statistics are each rank's own, as in any DDP run)."""
    from safetensors.torch import load_file

    cfg = write_config(tmp_path / "c.yaml", data, schedule={"steps": 6, "warmup_steps": 1}, eval_interval=3)
    out = tmp_path / "run"
    (tmp_path / "ddp_dump.py").write_text(DDP_DUMP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DUMP_DIR": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(tmp_path / "ddp_dump.py"),
        "train",
        "--config",
        str(cfg),
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=90)
    finally:  # never leave workers behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("run written to") == 1  # only rank 0 prints
    assert json.loads((out / "config.json").read_text())["step"] == 6
    rows = _rows(out)
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 6]
    assert rows[-1]["val_top1_alpha"] and float(rows[-1]["images_per_s"]) > 0
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) > 10
    # BatchNorm running statistics stay per rank after the last forward (DDP broadcasts rank 0's at the
    # start of each forward; rank 0's are the ones saved): every other tensor must be bit-identical
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k]) and ".running_" not in k]
    assert not different, different[:5]
    saved = load_file(str(out / "last.safetensors"))
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)  # what rank 0 wrote is what both hold
