"""End to end: a real exported bundle, real uvicorn on 127.0.0.1, concurrent requests for several
tasks. Shared-trunk batches must mix tasks, every batched answer must equal the same image sent
alone, and SIGTERM must finish every admitted request and exit 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time

import httpx
import numpy as np
import pytest

from tests.serving import METRICS_LAG_S, png, serve

TASKS = ["digits", "animals", "shapes"]


@pytest.fixture(scope="module")
def server(tiny_bundle):
    # one process (tests/test_workers.py runs the batching scenario with 2 API processes)
    args = ("--threads", "1", "--max-batch-size", "64", "--log-level", "warning", "--workers", "0")
    with serve(tiny_bundle, *args, env={"MTSERVE_MAX_WAIT_MS": "100"}) as (proc, url, _):
        yield proc, url


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


def test_client_that_disconnects_is_never_computed(server, tiny_bundle):
    """A request whose client leaves while it is queued (behind a busy engine: an idle one would
    take it at once) is answered 499 and never computed: the trunk computes exactly the rows of
    the other requests."""
    from contract.bundle import load_bundle
    from service.bench import payloads

    _, url = server
    port = int(url.rsplit(":", 1)[1])
    m = load_bundle(tiny_bundle).manifest
    flood_req = payloads.tensor_requests(m, ["digits"], rows=64)["digits"]  # 64 rows each
    lone_req = payloads.tensor_requests(m, ["digits"], rows=1)["digits"]
    trunk_rows = 'mtserve_batch_size_sum{segment="trunk"}'
    before = metric(httpx.get(url + "/metrics").text, re.escape(trunk_rows))
    flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(14)]
    try:
        for s in flood:
            s.sendall(flood_req)
        for _ in range(2000):  # same task, FIFO: the lone request will wait behind these rows
            if metric(httpx.get(url + "/metrics").text, "mtserve_queue_depth") >= 3 * 64:
                break
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(lone_req)  # and leave at once
        for s in flood:
            assert s.recv(64).startswith(b"HTTP/1.1 200"), "a flood request failed"
    finally:
        for s in flood:
            s.close()
    for _ in range(100):
        text = httpx.get(url + "/metrics").text
        if 'code="499",task="digits"' in text:
            break
        time.sleep(0.05)
    time.sleep(METRICS_LAG_S)  # the engine's last batch, in another process's files with --workers N
    text = httpx.get(url + "/metrics").text
    assert metric(text, re.escape('mtserve_requests_total{code="499",task="digits"}')) == 1
    assert metric(text, re.escape(trunk_rows)) - before == 14 * 64  # the lone row never computed


def test_cross_task_batches_equal_requests_alone_then_graceful_shutdown(server):
    proc, url = server

    def mixed(text: str) -> float:
        """From /metrics: trunk batches that held rows of more than one task."""
        single = metric(text, r'mtserve_batch_tasks_bucket\{le="1.0"\}')
        return metric(text, "mtserve_batch_tasks_count") - single

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
            # concurrent bursts: rows that arrive while a batch runs gather into the next one, which
            # then holds several tasks; an idle engine takes a lone row at once (continuous
            # batching), so a burst may by chance never overlap a running batch: up to 5 bursts
            jobs, together = [], []
            for _ in range(5):
                burst = [(t, i) for i in range(len(images)) for t in TASKS] * 2
                jobs += burst
                together += await asyncio.gather(*(predict(client, t, images[i]) for t, i in burst))
                await asyncio.sleep(METRICS_LAG_S)  # every process's updates, with --workers N
                after = (await client.get("/metrics")).text
                if mixed(after) >= 1:
                    break
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


RACE_S = 1.0  # how long before SIGTERM a request may still meet a closing idle connection (a loaded host)


def test_sigterm_under_load_answers_every_admitted_request_then_exits_0(tiny_bundle):
    """SIGTERM while 16 clients keep sending: every request is answered 200 or 503 ("shutting down")
    until the listener closes (after that: refused or closed connections, never another status);
    once a 503 has been answered, no request sent later gets 200; requests queued at SIGTERM are
    all answered 200 (a 503 only ever refuses admission); the process exits 0."""
    # one process (MTSERVE_WORKERS, default 0 here), whose engine is slower than its clients: rows queue;
    # tests/test_workers.py runs this scenario with 2 API processes and an emulated device
    args = ("--threads", "1", "--max-batch-size", "4", "--log-level", "warning")
    args += ("--workers", os.environ.get("MTSERVE_WORKERS", "0"))
    with serve(tiny_bundle, *args) as (proc, url, _):
        blob = png(3)

        async def scenario():
            log: list[tuple[float, float, object]] = []  # (sent, answered, status or exception)
            stop = asyncio.Event()

            async def client(i: int) -> None:
                async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                    while not stop.is_set():
                        sent = time.monotonic()
                        try:
                            r = await predict(c, TASKS[i % 3], blob)
                            out = (
                                r.status_code,
                                r.json()["error"]["message"] if r.status_code != 200 else "",
                            )
                        except httpx.TransportError as exc:
                            out = exc
                        log.append((sent, time.monotonic(), out))
                        if isinstance(out, Exception):
                            await asyncio.sleep(0.01)

            tasks = [asyncio.ensure_future(client(i)) for i in range(16)]
            queued = 0.0
            async with httpx.AsyncClient(base_url=url) as probe:
                for _ in range(300):  # under load, with rows queued
                    queued = metric((await probe.get("/metrics")).text, "mtserve_queue_depth")
                    if queued >= 4 and len(log) > 50:
                        break
                    await asyncio.sleep(0.01)
            t_sig = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            while proc.poll() is None and time.monotonic() - t_sig < 30:
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*tasks)
            return log, t_sig, queued

        log, t_sig, queued = asyncio.run(scenario())
        assert proc.wait(timeout=30) == 0
        assert queued >= 4
        # sent before SIGTERM: answered; but a request the client began just before it may reach an idle
        # keep-alive connection after the server closed it (RFC 9112 9.6's race: never read, never
        # admitted; seen once in CI under load), so a transport error is allowed in that last moment only
        before = [(sent, out) for sent, _, out in log if sent < t_sig]
        assert all(
            out == (200, "")
            or (isinstance(out, tuple) and out[0] == 503 and "shutting down" in out[1])
            or (isinstance(out, httpx.TransportError) and sent > t_sig - RACE_S)
            for sent, out in before
        ), [(round(sent - t_sig, 3), out) for sent, out in before]
        in_flight = [out for sent, done, out in log if sent < t_sig < done]
        assert sum(out == (200, "") for out in in_flight) >= 1, in_flight  # queued at SIGTERM: answered
        for _, _, out in log:
            if not isinstance(out, Exception):
                assert out == (200, "") or (out[0] == 503 and "shutting down" in out[1]), out
        first_503 = min(
            (done for _, done, out in log if isinstance(out, tuple) and out[0] == 503), default=None
        )
        if first_503 is not None:
            assert all(out != (200, "") for sent, _, out in log if sent > first_503)
        after = [out for sent, _, out in log if sent > t_sig]  # new requests kept coming until exit
        assert after and any(isinstance(out, Exception) or out[0] == 503 for out in after), after
