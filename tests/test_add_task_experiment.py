"""``mtserve experiment add-task --quick`` end to end on a 2-domain toy set (slow: 5 tiny trainings)."""

from __future__ import annotations

import json

import pytest

from tests.test_add_task import build_colors

pytest.importorskip("torch")


@pytest.mark.slow
def test_experiment_add_task_quick(tmp_path):
    from service.cli import main

    data = tmp_path / "mdb"
    for domain in ("red_green_blue", "rgb_again"):
        build_colors(data / domain, per_class=(8, 4))
    out = tmp_path / "out"
    rc = main(
        ["experiment", "add-task", "--data", str(data), "--out", str(out), "--quick", "--backbone",
         "test_resnet", "--timm-kwargs", "{}", "--plan", "bottom:1", "--workers", "0",
         "--work", str(tmp_path / "work")]
    )  # fmt: skip
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    kinds = sorted((r["kind"], r["domain"]) for r in results["runs"])
    assert kinds == [
        ("added", "red_green_blue"), ("added", "rgb_again"), ("independent", "red_green_blue"),
        ("independent", "rgb_again"), ("joint", "*"),
    ]  # fmt: skip
    added = [r for r in results["runs"] if r["kind"] == "added"]
    assert all(0 < r["share"] < 1 and r["donor"] for r in added)
    assert "added - joint" in (out / "table.md").read_text() and (out / "plot.png").is_file()
