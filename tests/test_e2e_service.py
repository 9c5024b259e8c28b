"""End to end: a real exported bundle, real uvicorn on 127.0.0.1, concurrent requests for several
tasks. Shared-trunk batches must mix tasks, every batched answer must equal the same image sent
alone, and SIGTERM must finish every admitted request and exit 0."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["digits", "animals", "shapes"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (30 + seed, 44, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tiny_bundle):
    port = free_port()
    env = os.environ | {"MTSERVE_MAX_WAIT_MS": "100", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "service.cli", "serve", str(tiny_bundle), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--threads", "1", "--max-batch-size", "64", "--log-level", "warning"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def scores(body: dict) -> list[np.ndarray]:
    out = []
    for pred in body["predictions"]:
        v = np.zeros(len(pred["top_k"]))
        for t in pred["top_k"]:
            v[t["index"]] = t["score"]
        out.append(v)
    return out


async def predict(client: httpx.AsyncClient, task: str, blob: bytes) -> httpx.Response:
    headers = {"content-type": "image/png"}
    return await client.post(f"/predict/{task}", content=blob, headers=headers, params={"top_k": 1000})


def metric(text: str, pattern: str) -> float:
    m = re.search("^" + pattern + r" (\S+)$", text, re.M)
    assert m, pattern
    return float(m.group(1))


def test_client_that_disconnects_is_never_computed(server):
    _, url = server
    port = int(url.rsplit(":", 1)[1])
    blob = png(9)
    with socket.create_connection(("127.0.0.1", port)) as s:
        head = "POST /predict/shapes HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
        s.sendall(f"{head}Content-Length: {len(blob)}\r\n\r\n".encode() + blob)
        time.sleep(0.02)  # well inside max_wait_ms=100: the batch has not formed yet
    trunk = 'mtserve_batch_size_count{segment="trunk"}'
    for _ in range(100):
        text = httpx.get(url + "/metrics").text
        if 'code="499",task="shapes"' in text:
            break
        time.sleep(0.05)
    assert metric(text, re.escape('mtserve_requests_total{code="499",task="shapes"}')) == 1
    time.sleep(0.2)
    assert metric(httpx.get(url + "/metrics").text, re.escape(trunk)) == 0  # nothing computed


def test_cross_task_batches_equal_requests_alone_then_graceful_shutdown(server):
    proc, url = server
    images = [png(i) for i in range(4)]

    async def scenario():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            alone = {}
            for t in TASKS:
                for i, blob in enumerate(images):
                    r = await predict(client, t, blob)
                    assert r.status_code == 200, r.text
                    alone[t, i] = scores(r.json())[0]
            before = (await client.get("/metrics")).text
            jobs = [(t, i) for i in range(len(images)) for t in TASKS] * 2
            together = await asyncio.gather(*(predict(client, t, images[i]) for t, i in jobs))
            after = (await client.get("/metrics")).text
            # several images of one task in one request ride the same batches too
            files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]
            multi = await client.post("/predict/animals", files=files, params={"top_k": 1000})
            # graceful shutdown: requests admitted before SIGTERM all complete
            pending = [asyncio.ensure_future(predict(client, t, images[0])) for t in TASKS * 4]
            async with httpx.AsyncClient(base_url=url) as probe:  # wait until some are queued
                for _ in range(200):
                    if metric((await probe.get("/metrics")).text, "mtserve_queue_depth") >= 3:
                        break
            proc.send_signal(signal.SIGTERM)
            drained = await asyncio.gather(*pending, return_exceptions=True)
            return alone, before, jobs, together, after, multi, drained

    alone, before, jobs, together, after, multi, drained = asyncio.run(scenario())

    worst = 0.0
    for (t, i), r in zip(jobs, together, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == t and body["model_version"] == "1"
        worst = max(worst, float(np.abs(scores(body)[0] - alone[t, i]).max()))
    assert multi.status_code == 200
    for i, s in enumerate(scores(multi.json())):
        worst = max(worst, float(np.abs(s - alone["animals", i]).max()))
    assert worst <= 1e-5, worst

    # from /metrics: trunk batches that held rows of more than one task
    def mixed(text: str) -> float:
        single = metric(text, r'mtserve_batch_tasks_bucket\{le="1.0"\}')
        return metric(text, "mtserve_batch_tasks_count") - single

    assert mixed(before) == 0  # sequential requests: never mixed
    assert mixed(after) >= 1
    assert metric(after, 'mtserve_requests_total{code="200",task="shapes"}') >= 12
    assert 'providers="CPUExecutionProvider"' in after

    # admitted before SIGTERM (>= 3 were queued): 200; sent after it: 503 or connection refused
    codes = [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in drained]
    assert codes.count(200) >= 3, codes
    for r in drained:
        if isinstance(r, httpx.Response):
            assert r.status_code in (200, 503), codes
            assert r.status_code == 200 or "shutting down" in r.json()["error"]["message"]
        else:
            assert isinstance(r, httpx.TransportError), codes
    assert proc.wait(timeout=30) == 0
