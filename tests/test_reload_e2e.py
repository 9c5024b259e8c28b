"""End to end: reloads under load fail no request. A real uvicorn process on 127.0.0.1 serves v1; a
steady stream of concurrent /predict and /v2 infer requests runs while the bundle is reloaded three
times (v2, v3, v4). Every answer must be 200, from a version loaded at that moment, and a request
sent after a reload returned must be answered by that reload's version or a later one."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import httpx
import numpy as np
import pytest

from tests.serving import METRICS_LAG_S, png, serve
from tests.test_e2e_service import TASKS
from tests.test_reload import TOKEN, make_model_dir

AUTH = {"Authorization": f"Bearer {TOKEN}"}
WORKERS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bundle):
    models = make_model_dir(tmp_path_factory.mktemp("reload-e2e"), tiny_bundle, extra_versions=("3", "4"))
    env = {"MTSERVE_ADMIN_TOKEN": TOKEN, "MTSERVE_MAX_WAIT_MS": "2"}
    args = ("--threads", "1", "--max-batch-size", "16", "--log-level", "info")
    with serve(models / "v1", *args, env=env, log=models.parent / "server.log") as (proc, url, log):
        yield proc, url, log


def tensor_body(seed: int) -> dict:
    x = np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)
    return {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }


def test_reloads_under_load_fail_no_request(server):
    proc, url, log = server
    images = [png(i) for i in range(3)]
    tensors = [tensor_body(i) for i in range(3)]
    results: list[tuple[int, float, float, int, str]] = []  # worker, sent, answered, status, version
    reloads: list[tuple[float, float, httpx.Response]] = []  # sent, returned, response

    async def worker(client: httpx.AsyncClient, w: int, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            task = TASKS[(w + i) % len(TASKS)]
            sent = time.monotonic()
            if i % 2:
                r = await client.post(f"/v2/models/{task}/infer", json=tensors[i % 3])
            else:
                r = await client.post(
                    f"/predict/{task}", content=images[i % 3], headers={"content-type": "image/png"}
                )
            version = r.json().get("model_version", "?") if r.status_code == 200 else r.text
            results.append((w, sent, time.monotonic(), r.status_code, version))
            i += 1

    async def scenario() -> str:
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            workers = [asyncio.create_task(worker(client, w, stop)) for w in range(WORKERS)]
            for name in ("v2", "v3", "v4"):
                await asyncio.sleep(0.4)
                sent = time.monotonic()
                r = await client.post("/admin/reload", json={"bundle": name}, headers=AUTH)
                reloads.append((sent, time.monotonic(), r))
            await asyncio.sleep(0.4)
            stop.set()
            await asyncio.gather(*workers)
            await asyncio.sleep(METRICS_LAG_S)  # the other processes' last updates
            metrics = (await client.get("/metrics")).text
        return metrics

    metrics = asyncio.run(scenario())

    for k, (_, _, r) in enumerate(reloads):
        assert r.status_code == 200, r.text
        assert r.json()["version"] == str(k + 2) and r.json()["previous_version"] == str(k + 1)
    bad = [r for r in results if r[3] != 200]
    assert not bad, bad[:5]
    versions = [int(r[4]) for r in results]
    assert set(versions) <= {1, 2, 3, 4} and {1, 4} <= set(versions)
    for k, (sent, returned, _) in enumerate(reloads):
        new = k + 2
        # sent after the reload returned: admitted after the swap, so the new version (or later)
        assert all(int(v) >= new for _, s, _, _, v in results if s > returned), k
        # answered before the reload was even sent: an older version
        assert all(int(v) < new for _, _, a, _, v in results if a < sent), k
        during = [r for r in results if r[1] < returned and r[2] > sent]
        assert len(during) >= WORKERS, (k, len(during))  # the stream went on during the reload
    for w in range(WORKERS):  # one client's answers never go back to an older version
        seen = [int(v) for ww, _, _, _, v in sorted(results, key=lambda r: r[1]) if ww == w]
        assert seen == sorted(seen), (w, seen)

    info = re.findall(r'^mtserve_model_info\{[^}]*version="(\d+)"[^}]*\} 1.0$', metrics, re.M)
    assert info == ["4"]
    codes = re.findall(r'^mtserve_requests_total\{code="(\d+)",task="\w+"\} (\S+)$', metrics, re.M)
    assert {c for c, n in codes if float(n) > 0} == {"200"}
    assert sum(float(n) for _, n in codes) == len(results)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert len(re.findall(r"reload: now serving tiny (\d) from", text)) == 3, text[-3000:]
    during = sum(1 for a, b, _ in reloads for r in results if r[1] < b and r[2] > a)
    figures = [r.json() for *_, r in reloads]
    print(f"\n{len(results)} requests, {during} during reloads, 0 failed; reloads: {figures}")
