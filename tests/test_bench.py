"""Smoke test of `mtserve bench`: every scenario writes its JSON, markdown and PNG (tiny bundle, --quick).

No timing assertions: the figures of a smoke run mean nothing.
"""

from __future__ import annotations

import argparse
import json
from importlib.util import find_spec
from pathlib import Path

import numpy as np
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


def test_each_p1_ratio_is_over_the_engine_timed_around_its_route(bench_out: Path) -> None:
    data = json.loads((bench_out / "overhead-demo.json").read_text())
    samples = data["engine_samples_at_max_batch"]
    assert len(samples) == len(data["rows"]) + 1  # before, then after each route (one load point each)
    for i, row in enumerate(data["rows"]):
        assert row["engine_ips_at_max_batch"] == pytest.approx((samples[i] + samples[i + 1]) / 2, abs=0.2)
        assert row["ratio"] == pytest.approx(row["throughput_rps"] / row["engine_ips_at_max_batch"], abs=1e-3)


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
    assert c["pair_capacity"] == pytest.approx(2 / c["slowdown"], abs=0.03)  # two CPUs in units of one


def test_the_workers_figure_names_what_two_busy_cpus_were_worth() -> None:
    from service.bench.workers import _capacity_line

    c = {"start": {"pair_capacity": 1.21}, "end": {"pair_capacity": 1.87}}
    assert "1.21 / 1.87 CPUs" in _capacity_line(c)


def test_the_workers_figure_is_each_layouts_peak_over_the_connection_counts() -> None:
    """Each server's throughput is its best median over the connection counts (one layout saturates at
    fewer connections than another); the ratio is of those peaks; every point stays in the rows."""
    from service.bench.api_cpu import Target
    from service.bench.workers import _rows

    def rounds(*points):
        return [{"concurrency": c, "rps": rps, "front_ms": 0.2, "engine_ms": 0.03, "codes": {"200": 9},
                 "tool": "wrk"} for c, rps in points]  # fmt: skip

    one = Target("workers=1", [], rounds=rounds((128, 4000), (128, 4200), (128, 4100), (512, 3900)))
    two = Target("workers=2", [], rounds=rounds((128, 6000), (512, 7600), (512, 8000), (512, 9000)))
    rows = _rows([one, two])
    assert [(r["server"], r["connections"], r["rps"], r["peak"]) for r in rows] == [
        ("workers=1", 128, 4100, True),
        ("workers=1", 512, 3900, False),
        ("workers=2", 128, 6000, False),
        ("workers=2", 512, 8000, True),  # the median of its three rounds
    ]
    assert [r["x_first"] for r in rows] == [
        1.0,
        round(3900 / 4100, 3),
        round(6000 / 4100, 3),
        round(8000 / 4100, 3),
    ]


def test_the_workers_ceiling_is_every_cpu_busy_at_the_rows_cpu_per_request() -> None:
    """2 CPUs; one API process saturated at 0.140 ms per request; two spending 0.143 + engine 0.017 +
    wrk 0.020 ms: with both CPUs busy they could serve 2 / 0.180 ms = 11,111 requests/s, 1.556 x the
    first layout's 7,143: the ratio's ceiling on this machine."""
    from service.bench.api_cpu import Target
    from service.bench.workers import _rows

    def rounds(rps, front, engine, loadgen):
        cpu = {"front_ms": front, "engine_ms": engine, "loadgen_ms": loadgen}
        return [{"concurrency": 128, "rps": rps, **cpu, "codes": {"200": 9}, "tool": "wrk"}]

    one = Target("workers=1", [], rounds=rounds(7143, 0.140, 0.016, 0.020))
    two = Target("workers=2", [], rounds=rounds(10000, 0.143, 0.017, 0.020))
    first, second = _rows([one, two], cpus=2)
    assert second["cpus_busy"] == 1.8 and first["cpus_busy"] == round(7143 * 0.176 / 1e3, 2)
    assert second["x_ceiling"] == round(2 / 0.180e-3 / 7143, 3) == 1.556
    assert second["x_first"] == 1.4
    assert "x_ceiling" not in _rows([one, two])[1]  # no CPU count, no ceiling


def test_a_round_counts_the_load_generators_cpu(monkeypatch) -> None:
    """``loadgen_ms``: the CPU of the child the round ran (wrk, hey), per request."""
    import subprocess
    import sys

    from service.bench import api_cpu

    def busy_child(port, req, n, c, body_file, tool):  # a load generator that burns 0.2 s of CPU
        burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass"
        subprocess.run([sys.executable, "-c", burn], check=True)
        return {"tool": "wrk", "codes": {"200": 100}, "errors": 0, "wall_s": 1.0}

    monkeypatch.setattr(api_cpu, "load", busy_child)
    monkeypatch.setattr(api_cpu.proc_cpu, "names_of", lambda pid: {})
    monkeypatch.setattr(api_cpu.proc_cpu.Snapshot, "take", classmethod(lambda cls, pid: None))
    monkeypatch.setattr(api_cpu.proc_cpu, "by_role", lambda before, after, names: {"front": 0.01})
    args = argparse.Namespace(requests=100, concurrency=4, loadgen="wrk")
    row = api_cpu.measure(api_cpu.Target("x", []), 1, 1, args, None, None)
    assert 2.0 <= row["loadgen_ms"] < 4.0  # 0.2 s (and the interpreter's start) over 100 requests
    assert row["front_ms"] == 0.1


def test_interleaved_rounds_measure_each_server_at_every_connection_count(monkeypatch) -> None:
    """Several connection counts: every round measures every server at each, both orders rotating."""
    import argparse
    import contextlib

    from service.bench import api_cpu

    seen = []
    monkeypatch.setattr(
        api_cpu.server, "running", lambda *a, **k: contextlib.nullcontext(argparse.Namespace(pid=1))
    )
    monkeypatch.setattr(api_cpu, "load", lambda *a, **k: None)

    def measure(t, port, pid, args, *rest):
        seen.append((t.name, args.concurrency))
        return {"rps": 1.0}

    monkeypatch.setattr(api_cpu, "measure", measure)
    targets = [api_cpu.Target("a", ["x"]), api_cpu.Target("b", ["x"])]
    args = argparse.Namespace(requests=100, rounds=2, loadgen="python")
    api_cpu.interleaved(
        targets, args, [128, 512], api_cpu.wrk.Request("/p", b"png", "image/png"), "rps", "{}"
    )
    assert seen == [
        ("a", 128),
        ("a", 512),
        ("b", 128),
        ("b", 512),
        ("b", 512),
        ("b", 128),
        ("a", 512),
        ("a", 128),
    ]
    assert [r["concurrency"] for r in targets[0].rounds] == [128, 512, 512, 128]


def test_idle_overhead_is_taken_over_the_engine_met_after_the_same_pause() -> None:
    """P5 subtracts the engine's batch-1 p50 after the client's pause (an idle engine is slower than a
    busy one); the back-to-back figure stays beside it; the HTTP floor subtracts nothing."""
    from service.bench.http_scenarios import _idle_row

    ref = {"engine_hot_ms": 0.5, "engine_paced_ms": 1.25, "decode_paced_ms": 0.5}
    s = {"requests": 100, "p50_ms": 3.0, "p99_ms": 4.0, "tool": "python"}
    row = _idle_row(2.0, "/predict JPEG", s, ref, runs_model=True, decodes=True)
    assert (row["overhead_p50_ms"], row["overhead_minus_decode_ms"]) == (1.75, 1.25)
    assert row["over_hot_engine_ms"] == 2.5
    floor = _idle_row(0.0, "GET /healthz", s, ref, runs_model=False, decodes=False)
    assert floor["overhead_p50_ms"] == floor["over_hot_engine_ms"] == 3.0


def test_paced_engine_calls_sleep_before_each_timed_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from service.bench import engine_bench

    class Engine:
        manifest = SimpleNamespace(input=SimpleNamespace(size=(3, 4, 4)))

        def __init__(self) -> None:
            self.calls: list[list[str]] = []

        def infer(self, x: np.ndarray, rows: list[str]) -> None:
            assert x.shape == (1, 3, 4, 4)
            self.calls.append(rows)

    slept: list[float] = []
    monkeypatch.setattr(engine_bench.time, "sleep", slept.append)
    e = Engine()
    out = engine_bench.paced_calls(e, ["a", "b"], 3, 0.01)  # type: ignore[arg-type]
    assert len(out) == 3 and slept == [0.01] * 3 and e.calls == [["a"], ["b"], ["a"]]


def test_api_cpu_serves_this_tree_again_before_an_emulated_device(tmp_path: Path) -> None:
    """``--ours-emulated MS``: each of this tree's servers once more with ``--emulate-device-ms MS`` (the
    front alone), measured into rounds of its own; a baseline tree's servers are not doubled."""
    import argparse

    from service.bench.api_cpu import add_arguments, targets_of

    p = argparse.ArgumentParser()
    add_arguments(p)
    other = tmp_path / "old"
    (other / "service").mkdir(parents=True)
    (other / "service" / "serve_cli.py").write_text('"--workers"')
    args = p.parse_args(["--ours-workers", "0,1", "--ours-emulated", "0.5", "--baseline", str(other)])
    targets = {t.name: t for t in targets_of(args, tmp_path)}
    assert set(targets) == {
        "ours-w0", "ours-w1", "ours@old-w0", "ours@old-w1", "ours-w0-emulated", "ours-w1-emulated", "raw",
        "raw-inline",
    }  # fmt: skip
    emulated = targets["ours-w1-emulated"]
    assert emulated.cmd == [*targets["ours-w1"].cmd, "--emulate-device-ms", "0.5"]
    assert "--emulate-device-ms" not in targets["ours-w1"].cmd
    assert emulated.rounds is not targets["ours-w1"].rounds


def test_p1_takes_the_best_throughput_of_its_client_counts_per_layout_and_route() -> None:
    from service.bench.http_scenarios import saturation_rows

    rows = [
        {"workers": "1", "route": "/v2", "clients": 64, "throughput_rps": 2900.0},
        {"workers": "1", "route": "/v2", "clients": 128, "throughput_rps": 3100.0},
        {"workers": "1", "route": "JPEG", "clients": 64, "throughput_rps": 2100.0},
        {"workers": "1", "route": "JPEG", "clients": 128, "throughput_rps": 2000.0},
        {"workers": "0", "route": "/v2", "clients": 64, "throughput_rps": 2500.0},
    ]
    best = saturation_rows(rows)
    assert [(r["workers"], r["route"], r["clients"]) for r in best] == [
        ("1", "/v2", 128),
        ("1", "JPEG", 64),
        ("0", "/v2", 64),
    ]


def test_saturation_flag_reaches_the_context(tmp_path) -> None:
    import argparse

    from service.bench.cli import add_arguments, contexts

    p = argparse.ArgumentParser()
    add_arguments(p)
    ctx = contexts(p.parse_args(["overhead", "--out", str(tmp_path), "--saturation", "2,4,8"]))["demo"]
    assert ctx.saturation == (2, 4, 8)
    quick = contexts(p.parse_args(["overhead", "--out", str(tmp_path), "--quick"]))["demo"]
    assert quick.saturation == (2,)  # the smoke run: one load point per route


@pytest.mark.parametrize("text", ["", "12x", "0", "128,-1", ","])
def test_workers_connection_counts_refuse_what_is_not_a_list_of_counts(text) -> None:
    import argparse

    from service.bench.workers import connection_counts

    with pytest.raises(argparse.ArgumentTypeError, match="connection counts"):
        connection_counts(text)
    assert connection_counts("128, 512") == [128, 512]


def test_bench_workers_sends_at_least_16_requests_a_connection_in_a_round(tiny_bundle, tmp_path, monkeypatch):
    """A round of a few requests per connection is mostly wrk opening and closing: --requests is raised
    to 16 per connection of the largest count, and the configuration records what was sent."""
    import argparse

    from service.bench import api_cpu, machine, workers

    sent = []

    def interleaved(targets, args, levels, *rest):
        sent.append((args.requests, list(levels)))
        for t in targets:
            row = {"rps": 1.0, "front_ms": 0.2, "engine_ms": 0.03, "codes": {"200": 1}, "tool": "wrk"}
            t.rounds += [row | {"concurrency": c} for c in levels]

    monkeypatch.setattr(api_cpu, "interleaved", interleaved)
    monkeypatch.setattr(machine, "contention", lambda: {"pair_capacity": 2.0})
    monkeypatch.setattr(workers.wrk, "pick", lambda tool, one_body: "wrk")
    p = argparse.ArgumentParser()
    workers.add_arguments(p)
    api_cpu.add_arguments(p)
    p.add_argument("--demo")
    p.add_argument("--out")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--loadgen", default="auto")
    common = ["--demo", str(tiny_bundle), "--out", str(tmp_path), "--workers-list", "1,2"]
    result = workers.run_workers(p.parse_args([*common, "--workers-concurrency", "64,512"]))
    assert sent[-1] == (16 * 512, [64, 512]) and result["config"]["requests"] == 16 * 512
    workers.run_workers(p.parse_args([*common, "--workers-concurrency", "8", "--requests", "3000"]))
    assert sent[-1] == (3000, [8])  # enough already: unchanged


async def test_api_cpu_v2_sends_one_fp32_row_and_the_raw_app_answers_it_as_v2_does(tiny_bundle) -> None:
    """``--route v2``: one preprocessed row in Triton's binary tensor extension; the raw floor app reads
    it and answers the same JSON shape as ``/v2`` (top-1 classification); a non-finite row fails it."""
    import argparse

    import orjson

    from contract.bundle import load_bundle
    from service.bench import api_cpu
    from service.bench.raw_asgi_app import make_app

    m = load_bundle(tiny_bundle, verify_sha256=False).manifest
    req = api_cpu.request_of(argparse.Namespace(route="v2", image=None), m, "digits", tiny_bundle)
    assert req.path == "/v2/models/digits/infer" and req.content_type == "application/octet-stream"
    length = int(dict(req.headers)["Inference-Header-Content-Length"])
    header = orjson.loads(req.body[:length])
    assert header["inputs"][0]["shape"] == [1, *m.input.size]
    assert len(req.body) - length == 4 * int(np.prod(m.input.size))
    png = api_cpu.request_of(argparse.Namespace(route="predict", image=None), m, "digits", tiny_bundle)
    assert png.path == "/predict/digits?top_k=5" and png.body[:4] == b"\x89PNG"

    app = make_app(str(tiny_bundle), workers=1)

    async def call(body: bytes) -> dict:
        sent, chunks = [], [{"type": "http.request", "body": body, "more_body": False}]
        scope = {"type": "http", "method": "POST", "path": req.path, "query_string": b"",
                 "headers": [(b"inference-header-content-length", str(length).encode())]}  # fmt: skip

        async def send(message):
            sent.append(message)

        async def receive():
            return chunks.pop()

        await app(scope, receive, send)
        assert sent[0]["status"] == 200
        return orjson.loads(sent[1]["body"])

    got = await call(req.body)
    [output] = got["outputs"]
    assert got["model_name"] == "digits" and output["shape"] == [1, 1] and output["datatype"] == "BYTES"
    score, index, label = output["data"][0].split(":")
    assert m.task("digits").labels[int(index)] == label and 0 < float(score) <= 1
    nan = req.body[:length] + np.full(int(np.prod(m.input.size)), np.nan, "<f4").tobytes()
    with pytest.raises(AssertionError):
        await call(nan)
