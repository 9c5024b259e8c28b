"""Issue 15 statistics against hand-computed values; per-image predictions of a real tiny run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.experiment_stats import bootstrap_gap, discordant, level_stats, mcnemar_exact, paired_t


def test_paired_t_hand_computed() -> None:
    # d = [1, 2, 3]: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 2 sqrt 3; df 2: p = 1 - t / sqrt(2 + t^2)
    t, p = paired_t([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert t == pytest.approx(2 * math.sqrt(3))
    assert p == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14))  # 0.07418
    assert paired_t([1.0], [0.0]) is None and paired_t([1.0, 2.0], [0.0, 1.0]) is None  # n=1, sd=0


def test_mcnemar_exact_hand_computed() -> None:
    # b=8, c=2: 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * 56 / 1024
    assert mcnemar_exact(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar_exact(2, 8) == mcnemar_exact(8, 2)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)


def test_discordant_counts_over_seeds() -> None:
    true = np.array([0, 1, 2, 3])
    bottom = [np.array([0, 1, 0, 0]), np.array([0, 1, 2, 3])]  # right: 2 then 4
    top = [np.array([0, 0, 2, 0]), np.array([1, 1, 2, 3])]  # right: 2 then 3
    # seed 0: b (bottom only) = image 1, c (top only) = image 2; seed 1: b = image 0
    assert discordant(bottom, top, true) == (2, 1)


def test_bootstrap_gap() -> None:
    const = {"a": np.full(50, 0.5), "b": np.full(30, -0.1)}
    gap, lo, hi = bootstrap_gap(const, n_boot=200)
    assert gap == pytest.approx(0.2) and lo == pytest.approx(0.2) and hi == pytest.approx(0.2)
    rng = np.random.default_rng(1)
    noisy = {"a": rng.choice([-1.0, 0.0, 1.0], 400, p=[0.2, 0.5, 0.3])}
    gap, lo, hi = bootstrap_gap(noisy, n_boot=1000)
    assert gap == pytest.approx(noisy["a"].mean())
    se = noisy["a"].std() / math.sqrt(400)  # the normal interval, for a large sample
    assert lo == pytest.approx(gap - 1.96 * se, abs=0.3 * se) and hi == pytest.approx(
        gap + 1.96 * se, abs=0.3 * se
    )


def test_level_stats_pairs_only_matching_files() -> None:
    true = np.array([0, 1, 1, 0])
    run = lambda pred, files="x": {"t": {"pred": np.array(pred), "true": true, "files": files}}  # noqa: E731
    preds = {
        "bottom:1": {0: run([0, 1, 1, 0]), 1: run([0, 1, 1, 0], files="other")},
        "head:8": {0: run([1, 1, 0, 0]), 1: run([0, 0, 0, 0])},
    }
    st = level_stats(preds, "bottom:1", "head:8", ["t"])
    assert st["seeds"] == [0]  # seed 1 saw other val files
    assert st["mcnemar"]["t"] == {"b": 2, "c": 0, "p": pytest.approx(0.5)}
    assert st["bootstrap"]["gap"] == pytest.approx(0.5)


def test_predictions_of_a_tiny_run(tmp_path) -> None:
    pytest.importorskip("timm")
    from tests.test_experiment import _image_folder
    from training.experiment import train_config, train_one
    from training.predictions import load_predictions

    data = _image_folder(tmp_path / "d", {"alpha": 3, "beta": 2})
    settings = {"backbone": "test_resnet", "timm_kwargs": {}, "input_size": 32, "steps": 2,
                "warmup_steps": 1, "lr": 0.01, "weight_decay": 0.0, "batch_per_task": 2, "device": "cpu",
                "workers": 0}  # fmt: skip
    cfg = train_config(data, ["alpha", "beta"], "shared+bn", 0, settings)
    run = train_one(cfg, tmp_path / "run", lambda _m: None, predictions=tmp_path / "p.npz")
    preds = load_predictions(tmp_path / "p.npz")
    assert set(preds) == {"alpha", "beta"} and len(preds["alpha"]["true"]) == 9
    for t, p in preds.items():  # the npz reproduces the trainer's own accuracy (checked in train_one too)
        assert float(np.mean(p["pred"] == p["true"])) == pytest.approx(run["acc"][t])
