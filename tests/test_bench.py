"""Smoke test of `mtserve bench`: every scenario writes its JSON, markdown and PNG (tiny bundle, --quick).

No timing assertions: the figures of a smoke run mean nothing.
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest

from service.bench.cli import SCENARIOS
from service.cli import main

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def bench_out(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    singles = root / "singles"
    singles.mkdir()
    (singles / "t00").symlink_to(tiny_bundle)
    out = root / "out"
    b = str(tiny_bundle)
    argv = ["bench", "all", "--quick", "--out", str(out), "--threads", "1", "--demo", b, "--demo8", b]
    argv += ["--r50", b, "--r50-singles", str(singles)]
    assert main(argv) == 0
    return out


def test_every_scenario_writes_json_markdown_png(bench_out: Path) -> None:
    for name in SCENARIOS:
        for model in ["r50"] if name == "memory" else ["demo"]:
            stem = bench_out / f"{name}-{model}"
            data = json.loads(stem.with_suffix(".json").read_text())
            assert data["scenario"] == name and data["machine"]["usable_cpus"] >= 1
            assert "loadavg" in data["machine"] and data["machine"]["versions"]["onnxruntime"]
            assert stem.with_suffix(".md").read_text().startswith("### ")
            if name == "peer" and find_spec("litserve") is None:
                continue
            assert stem.with_suffix(".png").stat().st_size > 1000


def test_summary_lists_the_targets(bench_out: Path) -> None:
    data = json.loads((bench_out / "summary.json").read_text())
    targets = {row["target"].split()[0] for row in data["targets"]}
    assert {"P1", "P2", "P3", "P5", "P6"} <= targets
    assert "| target |" in (bench_out / "summary.md").read_text()


def test_scenarios_answer_every_request(bench_out: Path) -> None:
    """The load generator reached the servers: requests counted, no transport errors."""
    data = json.loads((bench_out / "overhead-demo.json").read_text())
    for row in data["rows"]:
        assert row["requests"] > 0 and set(row["codes"]) == {"200"}


def test_service_bench_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, service.bench.cli, service.bench.http_scenarios, service.bench.memory, "
    code += "service.bench.peer, service.bench.peer_litserve; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_contention_probe_times_a_loop_alone_and_in_a_pair() -> None:
    from service.bench.machine import contention

    c = contention()
    assert 0 < c["loop_alone_s"] < 60 and 0 < c["loop_in_pair_s"] < 60
    assert c["slowdown"] == pytest.approx(c["loop_in_pair_s"] / c["loop_alone_s"], abs=0.02)  # rounded parts
