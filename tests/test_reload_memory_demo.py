"""The add-task demo's memory reading (training/add_task_demo.py): both readings follow the same
traffic mix (every request kind, multi-row /v2 included), so first-use costs are not counted as the
add's growth; the mix after the add includes the new task."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np

from training import add_task_demo as demo
from training.add_task_demo_http import request_mix


def test_request_mix_sends_every_kind_on_every_task():
    seen: list[tuple[str, str, int | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        rows = None
        if request.url.path.startswith("/v2/"):
            rows = json.loads(request.content)["inputs"][0]["shape"][0]
            return_ = {"outputs": []}
        else:
            return_ = {"predictions": []}
        seen.append((request.url.path, request.url.query.decode(), rows))
        return httpx.Response(200, json=return_)

    client = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://t")
    bodies = {"a": b"png-a", "b": b"png-b"}
    request_mix(client, ["a", "b"], bodies, [3, 8, 8])
    for t in ("a", "b"):
        assert sorted(r for p, _, r in seen if p == f"/v2/models/{t}/infer") == [1, 3, 8]
        assert sorted(q for p, q, _ in seen if p == f"/predict/{t}") == ["", "top_k=1", "top_k=3"]


def test_both_memory_readings_follow_the_same_traffic_mix(monkeypatch, tmp_path):
    calls: list[tuple] = []
    monkeypatch.setattr(demo, "wait_ready", lambda *a: None)
    monkeypatch.setattr(demo, "answers", lambda *a: calls.append(("answers",)) or {"x": 1})
    monkeypatch.setattr(demo, "request_mix", lambda c, tasks, *a: calls.append(("mix", list(tasks))))
    monkeypatch.setattr(demo, "steady_state", lambda c, tasks, *a: calls.append(("steady", list(tasks))))
    monkeypatch.setattr(demo, "tree_rss", lambda pid: calls.append(("rss",)) or {1: 100})
    monkeypatch.setattr(
        demo, "add_and_reload", lambda *a: calls.append(("add",)) or demo.Timeline(0, 1, 2, {})
    )
    monkeypatch.setattr(demo, "served_correct", lambda *a: calls.append(("served",)) or 1)
    monkeypatch.setattr(demo, "routes", lambda *a: {})
    monkeypatch.setattr(demo, "request_stats", lambda *a: {})
    monkeypatch.setattr(demo, "file_and_memory_stats", lambda *a: {})
    monkeypatch.setattr(demo.time, "sleep", lambda s: None)
    inputs = demo.Inputs(
        np.zeros((3, 3, 8, 8), np.float32), [b"p"], {"*": b"p", "x": b"p", "new": b"p"}, [(Path("v"), "c")]
    )
    monkeypatch.setattr(demo, "fixed_inputs", lambda *a: inputs)
    monkeypatch.setattr(demo, "Load", lambda *a, **k: SimpleNamespace())
    (tmp_path / "add.json").write_text("{}")
    setup = demo.Setup(
        tmp_path, tmp_path, {"tasks": {"x": {}}, "input": {"size": [3, 8, 8]}}, "http://t", Path("l")
    )
    args = argparse.Namespace(
        task="new", steady_requests=4, clients=1, pause_ms=1.0, bundle="b", nice=0, rounds=2
    )
    result = demo.measure(args, setup, SimpleNamespace(pid=1))
    names = [c[0] for c in calls]
    add = names.index("add")
    # before the add: the answers, then 2 rounds of the mix on the old tasks, each read
    assert names[:add] == ["answers", "mix", "steady", "rss", "mix", "steady", "rss"]
    assert all(c[1] == ["x"] for c in calls[:add] if c[0] in ("mix", "steady"))
    # after it: the answers, the new task's top-1, then the same 2 rounds, the new task included
    assert names[add + 1 :] == ["answers", "served", "mix", "steady", "rss", "mix", "steady", "rss"]
    assert all(c[1] == ["x", "new"] for c in calls[add:] if c[0] in ("mix", "steady"))
    assert result["rss_rounds_before_bytes"] == [100, 100] == result["rss_rounds_after_bytes"]
