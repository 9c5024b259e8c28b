"""``mtserve experiment paper``: plan choice, Delta_m arithmetic, resumable results, --quick end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.experiment_report import delta_m, paired_gaps, summarize, table_markdown

TASKS = {"a": {"x": 0.5, "y": 0.9}, "b": {"x": 0.4, "y": 1.0}}


def _results(runs: list[dict]) -> dict:
    plans = [
        {"kind": "shared", "plan": "shared", "proportion": 0.01, "level": None, "accounting": {}},
        {"kind": "top", "plan": "top:4", "proportion": 0.60, "level": 0.60, "accounting": {}},
        {"kind": "bottom", "plan": "bottom:3", "proportion": 0.58, "level": 0.60, "accounting": {}},
        {"kind": "independent", "plan": "independent", "proportion": 1.0, "level": None, "accounting": {}},
    ]
    settings = {
        "backbone": "b",
        "timm_kwargs": {},
        "input_size": 32,
        "steps": 1,
        "batch_per_task": 1,
        "lr": 0.1,
        "seeds": [0, 1],
    }
    full = [{"dataset": "d", "wall_s": 1.0, **r} for r in runs]
    return {
        "settings": settings,
        "datasets": {"d": {"tasks": {"x": 2, "y": 2}, "plans": plans}},
        "runs": full,
    }


def test_delta_m_hand_computed() -> None:
    # x: (0.5 - 0.4) / 0.4 = +25 %, y: (0.9 - 1.0) / 1.0 = -10 %  ->  mean +7.5 %
    assert delta_m(TASKS["a"], TASKS["b"]) == pytest.approx(7.5)
    assert delta_m(TASKS["b"], TASKS["b"]) == 0.0


def test_summarize_delta_m_and_paired_gap() -> None:
    runs = [
        {"plan": "independent", "seed": 0, "acc": {"x": 0.4, "y": 1.0}},
        {"plan": "independent", "seed": 1, "acc": {"x": 0.6, "y": 0.8}},
        {"plan": "shared", "seed": 0, "acc": {"x": 0.5, "y": 0.9}},
        {"plan": "shared", "seed": 1, "acc": {"x": 0.5, "y": 0.9}},
        {"plan": "top:4", "seed": 0, "acc": {"x": 0.3, "y": 0.5}},
        {"plan": "top:4", "seed": 1, "acc": {"x": 0.4, "y": 0.6}},
        {"plan": "bottom:3", "seed": 0, "acc": {"x": 0.5, "y": 0.7}},
        {"plan": "bottom:3", "seed": 1, "acc": {"x": 0.5, "y": 0.6}},
    ]
    results = _results(runs)
    rows = {r["plan"]: r for r in summarize(results)["d"]}
    assert rows["independent"]["delta_m"] == (0.0, 0.0)  # paired with itself seed by seed
    # independent mean: x 0.5, y 0.9; shared means equal it -> Delta_m 0; per seed: +7.5 and
    # ((0.5-0.6)/0.6 + (0.9-0.8)/0.8) / 2 * 100 = (-16.667 + 12.5) / 2 = -2.083
    dm, dm_std = rows["shared"]["delta_m"]
    assert dm == pytest.approx(0.0)
    assert dm_std == pytest.approx(abs(7.5 - (-2.0833333)) / 2**0.5, rel=1e-4)
    assert rows["shared"]["per_task"]["x"] == pytest.approx((0.5, 0.0))
    assert rows["top:4"]["mean"][0] == pytest.approx((0.4 + 0.5) / 2)
    (gap,) = paired_gaps(results, "d")
    assert gap["per_seed"] == pytest.approx([0.6 - 0.4, 0.55 - 0.5])
    assert gap["bottom_wins"] == 2
    table = table_markdown(results)
    assert "| independent | 100.0% |" in table and "+0.00 ± 0.00" in table


def test_choose_plans_matches_top_and_bottom() -> None:
    pytest.importorskip("timm")
    from training.experiment import choose_plans

    plans = choose_plans("resnet18", {"a": 10, "b": 10, "c": 4}, {}, None, [0.05])
    kinds = [p.kind for p in plans]
    assert kinds[0] == "shared" and kinds[-1] == "independent"
    tops = [p for p in plans if p.kind == "top"]
    assert [p.plan for p in tops] == ["top:8", "top:7"]  # the two smallest top proportions
    for top in tops:
        bottom = next(p for p in plans if p.plan == top.match)
        others = [p.proportion for p in plans if p.kind == "bottom"]
        assert abs(bottom.proportion - top.proportion) <= min(abs(o - top.proportion) for o in others)
    extra = [p for p in plans if p.kind == "bottom" and p.level is None]
    assert len(extra) == 1 and extra[0].proportion < 0.1


def _image_folder(root: Path, tasks: dict[str, int], per_class: int = 3) -> Path:
    from PIL import Image

    for t, (task, n_classes) in enumerate(tasks.items()):
        for split in ("train", "val"):
            for c in range(n_classes):
                folder = root / task / split / f"c{c}"
                folder.mkdir(parents=True)
                for i in range(per_class):
                    color = (40 * c + 10 * t, 200 - 30 * c, 17 * i)
                    Image.new("RGB", (32, 32), color).save(folder / f"{i}.png")
    return root


def test_quick_end_to_end_and_resume(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    from service.cli import main

    data = _image_folder(tmp_path / "mdb", {"alpha": 3, "beta": 2})
    control = _image_folder(tmp_path / "ctl", {"fine": 3, "coarse": 2})
    out = tmp_path / "out"
    argv = [
        "experiment",
        "paper",
        "--data",
        str(data),
        "--control-data",
        str(control),
        "--out",
        str(out),
        "--quick",
        "--backbone",
        "test_resnet",
        "--timm-kwargs",
        "{}",
        "--workers",
        "0",
        "--work",
        str(tmp_path / "work"),
    ]
    assert main(argv) == 0
    for name in ("results.json", "table.md", "plot.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    n_plans = {d: len(v["plans"]) for d, v in results["datasets"].items()}
    assert set(n_plans) == {"mdb", "control"}
    assert len(results["runs"]) == sum(n_plans.values())  # one seed in --quick
    assert results["settings"]["steps"] == 3 and results["command"].startswith("mtserve experiment paper")
    assert all(set(r["acc"]) == set(results["datasets"][r["dataset"]]["tasks"]) for r in results["runs"])
    assert all((out / r["predictions"]).is_file() for r in results["runs"])  # per-image, every run
    kinds = {r["plan"] for r in results["runs"]}
    assert "shared+bn" in kinds and any(k.startswith("head:") for k in kinds)
    table = (out / "table.md").read_text()
    assert "McNemar alpha" in table and "paired bootstrap 95% CI" in table
    for rows in summarize(results).values():
        assert next(r for r in rows if r["kind"] == "independent")["delta_m"][0] == 0.0
    assert main(argv) == 0  # resumes: nothing left to run
    assert len(json.loads((out / "results.json").read_text())["runs"]) == len(results["runs"])
    from training.experiment import Results

    with pytest.raises(ValueError, match="other settings"):
        Results(out / "results.json", {"steps": 99})


def test_same_initial_function_for_every_plan(tmp_path: Path) -> None:
    """Same init policy: for one seed, every plan starts as the same function of each task."""
    torch = pytest.importorskip("torch")
    from training.config import parse_config
    from training.experiment import train_config
    from training.imagefolder import load_task
    from training.run_setup import build_run
    from training.trainer import seed_everything

    data = _image_folder(tmp_path / "mdb", {"alpha": 3, "beta": 2, "gamma": 4})
    settings = {
        "backbone": "test_resnet",
        "timm_kwargs": {},
        "input_size": 32,
        "steps": 2,
        "warmup_steps": 1,
        "lr": 0.01,
        "weight_decay": 0.0,
        "batch_per_task": 2,
        "device": "cpu",
        "workers": 0,
    }
    x = torch.randn(2, 3, 32, 32)
    outputs = {}
    for plan in ("shared", "top:4", "bottom:2", "independent", "shared+bn"):
        cfg = parse_config(train_config(data, ["alpha", "beta", "gamma"], plan, 7, settings))
        seed_everything(cfg.seed)  # what the trainer does before building the run
        net = build_run(cfg, [load_task(n, t.root) for n, t in cfg.tasks.items()]).net.eval()
        outputs[plan] = [net.forward_task(x, t) for t in ("alpha", "beta", "gamma")]
    for plan, outs in outputs.items():
        assert all(torch.equal(a, b) for a, b in zip(outs, outputs["shared"], strict=True)), plan


def test_task_counts_only_runs_just_the_subsets(tmp_path: Path) -> None:
    """``--task-counts 2 --task-counts-only``: the first 2 task folders as their own data set, and not
    the whole --data (whose runs another --out holds); the flag is in the command, not in the settings."""
    pytest.importorskip("timm")
    from service.cli import main

    data = _image_folder(tmp_path / "mdb", {"alpha": 3, "beta": 2, "gamma": 2})
    out = tmp_path / "out"
    few = ["--levels", "", "--small-levels", "", "--bottom-levels", "", "--no-bn-ablation"]
    argv = ["experiment", "paper", "--data", str(data), "--out", str(out), "--quick", "--backbone",
            "test_resnet", "--timm-kwargs", "{}", "--task-counts", "2", "--task-counts-only", *few,
            "--work", str(tmp_path / "work")]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["datasets"]) == ["mdb-2tasks"]
    assert list(results["datasets"]["mdb-2tasks"]["tasks"]) == ["alpha", "beta"]
    assert {r["plan"] for r in results["runs"]} == {"shared", "independent"}
    assert "--task-counts-only" in results["command"] and "task_counts_only" not in results["settings"]
