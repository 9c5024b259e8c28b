"""``mtserve serve --workers N``: a supervisor, one engine process, N API processes on one port
(service/supervisor.py). Real processes on 127.0.0.1; each guarantee of the single process is checked
across processes. The engine emulates a device (``--emulate-device-ms``: a batch sleeps, uses no CPU) where
a test needs the engine busy for a known time; no test asserts a speed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serving import METRICS_LAG_S, png, serve

TASKS = ["digits", "animals", "shapes"]
TRUNK_ROWS = 'mtserve_batch_size_sum{segment="trunk"}'  # observed once a batch has run
TAKEN = 'mtserve_queue_duration_seconds_count{task="digits"}'  # observed when a batch takes a request


def metric(text: str, name: str) -> float:
    m = re.search("^" + re.escape(name) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def children(pid: int) -> dict[str, int]:
    """The supervisor's children by role: engine, api-0, api-1, ..."""
    out = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"service.supervisor" in argv:
            role = argv[argv.index(b"service.supervisor") + 1].decode()
            if role == "api":
                role = f"api-{argv[argv.index(b'--index') + 1].decode()}"
            out[role] = int(child)
    return out


def run_dir(pid: int) -> Path:
    argv = Path(f"/proc/{children(pid)['engine']}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"--run-dir") + 1].decode())


def answered_by_pid(run: Path) -> dict[int, float]:
    """pid -> requests answered 200, from prometheus-client's per-process files."""
    from prometheus_client.mmap_dict import MmapedDict

    out: dict[int, float] = {}
    for path in (run / "metrics").glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _ = json.loads(key)
            if name == "mtserve_requests_total" and labels.get("code") == "200":
                out[pid] = out.get(pid, 0.0) + value
    return out


def raw_predict(port: int, task: str, blob: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    head = f"POST /predict/{task} HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\n"
    head += f"content-length: {len(blob)}\r\n\r\n"
    s.sendall(head.encode() + blob)
    return s


async def post(client: httpx.AsyncClient, task: str, seed: int = 0) -> httpx.Response:
    return await client.post(f"/predict/{task}", content=png(seed), headers={"content-type": "image/png"})


async def wait_metric(client: httpx.AsyncClient, name: str, at_least: float, limit_s: float = 10.0) -> float:
    deadline = time.monotonic() + limit_s
    while True:
        value = metric((await client.get("/metrics")).text, name)
        if value >= at_least or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.02)


EMULATED = ("--workers", "2", "--log-level", "warning", "--emulate-device-ms")


@pytest.fixture(scope="module")
def emulated(tiny_bundle):
    """2 API processes; each batch keeps the engine busy 1 s."""
    with serve(tiny_bundle, *EMULATED, "1000", "--max-batch-size", "8", "--max-wait-ms", "0") as (
        proc,
        url,
        _,
    ):
        yield proc, url


def test_processes_and_readyz(emulated):
    proc, url = emulated
    assert set(children(proc.pid)) == {"engine", "api-0", "api-1"}
    ready = httpx.get(url + "/readyz").json()
    assert ready["status"] == "ready" and ready["providers"] == ["EmulatedDevice"]  # the engine's


def test_one_batcher_mixes_the_requests_of_every_api_process(emulated):
    """Requests of three tasks, accepted by both API processes, ride the same engine batches."""
    proc, url = emulated
    run = run_dir(proc.pid)
    apis = {pid for role, pid in children(proc.pid).items() if role.startswith("api")}

    async def scenario() -> tuple[str, str]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
            before = (await probe.get("/metrics")).text
            for _ in range(5):  # the kernel picks the process that accepts: until both did
                clients = [httpx.AsyncClient(base_url=url, timeout=30) for _ in range(13)]
                taken = metric((await probe.get("/metrics")).text, TAKEN)
                busy = asyncio.ensure_future(post(clients[0], "digits"))  # the engine: busy 1 s
                await wait_metric(probe, TAKEN, taken + 1)
                answers = await asyncio.gather(*(post(c, TASKS[i % 3], i) for i, c in enumerate(clients[1:])))
                assert (await busy).status_code == 200
                assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
                for c in clients:
                    await c.aclose()
                if set(answered_by_pid(run)) >= apis:
                    break
            await asyncio.sleep(METRICS_LAG_S)
            return before, (await probe.get("/metrics")).text

    before, after = asyncio.run(scenario())
    assert set(answered_by_pid(run)) >= apis  # both API processes answered requests
    single = 'mtserve_batch_tasks_bucket{le="1.0"}'
    mixed = metric(after, "mtserve_batch_tasks_count") - metric(after, single)
    assert mixed - (metric(before, "mtserve_batch_tasks_count") - metric(before, single)) >= 1


def connections_by_pid(port: int, pids: list[int]) -> dict[int, int]:
    """Established connections to ``port`` held by each process (/proc/net/tcp inodes in its fds)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # local port, ESTABLISHED
            inodes.add(fields[9])
    out = {}
    for pid in pids:
        links = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir() if f.is_symlink()]
        out[pid] = sum(link[len("socket:[") : -1] in inodes for link in links if link.startswith("socket:["))
    return out


def test_connections_opened_together_spread_over_the_api_processes(emulated):
    """64 keep-alive connections opened at once (a load balancer's pool): each API process holds a
    fair part of them (a socket each on the port; one shared socket gave 0 / 128 in some runs)."""
    proc, url = emulated
    port = int(url.rsplit(":", 1)[1])
    apis = [pid for role, pid in children(proc.pid).items() if role.startswith("api")]
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
    try:
        for s in socks:  # an answer on each: every connection has been accepted by now
            s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        for s in socks:
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        held = connections_by_pid(port, apis)
        assert sum(held.values()) == 64, held
        assert min(held.values()) >= 16, held  # a hash of the addresses: 32 +- 4 (below 16: p < 1e-4)
    finally:
        for s in socks:
            s.close()


def test_a_client_that_leaves_is_not_computed(emulated):
    """Queued in the engine behind a busy batch, its client leaves: 499, its row never computed."""
    _, url = emulated
    port = int(url.rsplit(":", 1)[1])

    async def scenario() -> tuple[float, float]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
            await asyncio.sleep(METRICS_LAG_S)  # earlier tests' last batches in the files
            text = (await probe.get("/metrics")).text
            before = metric(text, TRUNK_ROWS)
            busy = asyncio.ensure_future(post(probe, "digits"))
            await wait_metric(probe, TAKEN, metric(text, TAKEN) + 1)  # computing
            lone = raw_predict(port, "shapes", png(5))
            assert await wait_metric(probe, "mtserve_queue_depth", 1) >= 1  # queued in the engine
            lone.close()
            assert (await busy).status_code == 200
            await wait_metric(probe, 'mtserve_requests_total{code="499",task="shapes"}', 1)
            await asyncio.sleep(1.5)  # a batch the lone row would have ridden has finished
            return before, metric((await probe.get("/metrics")).text, TRUNK_ROWS)

    before, after = asyncio.run(scenario())
    text = httpx.get(url + "/metrics").text
    assert metric(text, 'mtserve_requests_total{code="499",task="shapes"}') == 1
    assert after - before == 1  # only the busy request's row


def test_one_metrics_endpoint_for_every_process(emulated):
    proc, url = emulated
    roles = children(proc.pid)
    texts = [httpx.get(url + "/metrics").text for _ in range(6)]  # whichever API process answers
    totals = {metric(t, 'mtserve_requests_total{code="200",task="digits"}') for t in texts}
    assert len(totals) == 1 and totals.pop() >= 1  # the sum over processes, the same from each
    for role in [*roles, "supervisor"]:
        assert metric(texts[0], f'mtserve_process_cpu_seconds_total{{process="{role}"}}') > 0, role
    assert 'mtserve_model_info{bundle="tiny",providers="EmulatedDevice",version="1"} 1.0' in texts[0]
    assert len(re.findall("^mtserve_queue_depth ", texts[0], re.M)) == 1


def test_deadline_and_429_before_the_body_across_processes(tiny_bundle):
    """The engine busy 5 s with one row, the next batch (one row) ready behind it, its queue (2 rows)
    full: a new request is answered 429 with Retry-After before its body is sent; the waiting ones
    answer 504 at their deadline (2 s), while the engine still computes, and are never computed."""
    args = ("5000", "--max-batch-size", "1", "--queue-size", "2", "--max-images-per-request", "2")
    with serve(tiny_bundle, *EMULATED, *args, "--timeout-ms", "2000") as (_, url, _log):
        port = int(url.rsplit(":", 1)[1])

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
                t0 = time.monotonic()
                busy = [asyncio.ensure_future(post(probe, "digits", i)) for i in range(2)]
                await wait_metric(probe, TAKEN, 2)  # one computing, one batched behind it
                queued = [asyncio.ensure_future(post(probe, t)) for t in ("animals", "shapes")]
                assert await wait_metric(probe, "mtserve_queue_depth", 2) == 2
                with socket.create_connection(("127.0.0.1", port)) as s:  # headers only, no body
                    s.sendall(b"POST /predict/digits HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\n"
                              b"content-length: 1000000\r\n\r\n")  # fmt: skip
                    shed = s.recv(4096).decode("latin-1")
                answers = await asyncio.gather(*busy, *queued)
                return t0, shed, answers, time.monotonic()

        t0, shed, answers, t1 = asyncio.run(scenario())
        assert shed.startswith("HTTP/1.1 429") and "retry-after: 1" in shed.lower(), shed
        assert [r.status_code for r in answers] == [504] * 4
        assert t1 - t0 < 5.0  # answered at the deadline, not when the engine got to them
        time.sleep(5.5 - (time.monotonic() - t0))  # the busy batch is over: nothing else ran
        assert metric(httpx.get(url + "/metrics").text, TRUNK_ROWS) == 1


def test_sigterm_drains_every_process_and_exits_0(tiny_bundle):
    with serve(tiny_bundle, *EMULATED, "300", "--max-batch-size", "2") as (proc, url, _log):
        roles = children(proc.pid)
        run = run_dir(proc.pid)

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
                clients = [httpx.AsyncClient(base_url=url, timeout=30) for _ in range(8)]
                pending = [asyncio.ensure_future(post(c, TASKS[i % 3], i)) for i, c in enumerate(clients)]
                assert await wait_metric(probe, "mtserve_queue_depth", 2) >= 2
                proc.send_signal(signal.SIGTERM)
                answers = await asyncio.gather(*pending)
                for c in clients:
                    await c.aclose()
                return answers

        answers = asyncio.run(scenario())
        assert [r.status_code for r in answers] == [200] * 8  # admitted before SIGTERM: all answered
        assert proc.wait(timeout=60) == 0
        for pid in roles.values():
            assert (
                not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
            )
        assert not run.exists()


def test_cross_task_answers_equal_answers_alone_with_two_api_processes(tiny_bundle):
    """tests/test_e2e_service.py's batching scenario on the real engine behind 2 API processes: batches
    mix tasks, every batched answer equals the same image sent alone (<= 1e-5), SIGTERM answers every
    admitted request and exits 0."""
    from tests import test_e2e_service

    args = ("--workers", "2", "--threads", "1", "--max-batch-size", "64", "--log-level", "warning")
    with serve(tiny_bundle, *args, env={"MTSERVE_MAX_WAIT_MS": "100"}) as (proc, url, _):
        test_e2e_service.test_cross_task_batches_equal_requests_alone_then_graceful_shutdown((proc, url))


def test_sigterm_under_load_with_two_api_processes(tiny_bundle, monkeypatch):
    """tests/test_e2e_service.py's SIGTERM-under-load scenario (16 clients; every answer 200 or 503
    "shutting down"; requests queued at SIGTERM answered 200; exit 0) with 2 API processes and an
    engine slower than them (a 20 ms batch), so that rows queue in the engine."""
    from tests import test_e2e_service

    monkeypatch.setenv("MTSERVE_WORKERS", "2")
    monkeypatch.setenv("MTSERVE_EMULATE_DEVICE_MS", "20")
    test_e2e_service.test_sigterm_under_load_answers_every_admitted_request_then_exits_0(tiny_bundle)


def test_engine_death_answers_503_at_once_then_exits_non_zero(tiny_bundle):
    args = ("30000", "--max-batch-size", "1", "--timeout-ms", "60000")
    with serve(tiny_bundle, *EMULATED, *args) as (proc, url, _log):
        engine = children(proc.pid)["engine"]

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=60) as probe:
                clients = [httpx.AsyncClient(base_url=url, timeout=60) for _ in range(3)]
                pending = [asyncio.ensure_future(post(c, "digits", i)) for i, c in enumerate(clients)]
                await wait_metric(probe, TAKEN, 2)  # one computing, one batched behind it
                await wait_metric(probe, "mtserve_queue_depth", 1)  # one queued
                t0 = time.monotonic()
                os.kill(engine, signal.SIGKILL)
                answers = await asyncio.gather(*pending)
                waited = time.monotonic() - t0
                ready = await probe.get("/readyz")
                for c in clients:
                    await c.aclose()
                return answers, waited, ready

        answers, waited, ready = asyncio.run(scenario())
        assert [r.status_code for r in answers] == [503] * 3
        assert all("engine process exited" in r.json()["error"]["message"] for r in answers)
        assert waited < 30  # not when the batch would have finished
        assert ready.status_code == 503
        assert proc.wait(timeout=60) == 1  # the orchestrator restarts the pod


def test_reload_under_load_with_two_api_processes(tmp_path_factory, tiny_bundle):
    """tests/test_reload_e2e.py's scenario, with 2 API processes: every answer 200, every reload's
    version served by every API process once the reload has returned."""
    from tests import test_reload_e2e
    from tests.test_reload import TOKEN, make_model_dir

    models = make_model_dir(tmp_path_factory.mktemp("workers"), tiny_bundle, extra_versions=("3", "4"))
    env = {"MTSERVE_ADMIN_TOKEN": TOKEN, "MTSERVE_MAX_WAIT_MS": "2"}
    args = ("--workers", "2", "--threads", "1", "--max-batch-size", "16")
    with serve(models / "v1", *args, env=env, log=models.parent / "server.log") as server:
        test_reload_e2e.test_reloads_under_load_fail_no_request(server)


def test_children_exit_when_the_supervisor_is_killed(tiny_bundle):
    """kill -9 of the supervisor: the engine and the API processes see it (a pidfd on its pid) and
    exit; the engine, the last of them, removes the run directory."""
    with serve(tiny_bundle, *EMULATED, "1") as (proc, _url, _log):
        roles = children(proc.pid)
        run = run_dir(proc.pid)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            any(Path(f"/proc/{p}").exists() for p in roles.values()) or run.exists()
        ):
            time.sleep(0.1)
        assert not [r for r, p in roles.items() if Path(f"/proc/{p}").exists()]
        assert not run.exists()


def shared_rows(pid: int) -> int:
    """How many of the rows' shared memories (service/row_arena.py) process ``pid`` has mapped."""
    return Path(f"/proc/{pid}/maps").read_text().count("memfd:mtserve-rows")


def test_an_answer_does_not_depend_on_the_process_layout(tiny_bundle):
    """The same image gets the same JSON, byte for byte, from one process and from API processes in
    front of an engine process (probabilities are float32 in both), whether the rows reach the engine
    through shared memory (the default: each API process maps its own, the engine all of them) or on
    the socket (``--rows-shm-mb 0``)."""
    blob = png(3)
    answers: dict[tuple[str, ...], list[bytes]] = {}
    for layout in (("0",), ("2",), ("2", "--rows-shm-mb", "0")):
        args = ("--workers", *layout, "--threads", "1", "--log-level", "warning")
        with serve(tiny_bundle, *args) as (proc, url, _):
            for task in ("digits", "animals"):
                r = httpx.post(f"{url}/predict/{task}", content=blob, headers={"content-type": "image/png"})
                assert r.status_code == 200, r.text
                answers.setdefault(layout, []).append(r.content)
            if layout[0] != "0":
                mapped = {role: shared_rows(pid) for role, pid in children(proc.pid).items()}
                shm = 0 if "--rows-shm-mb" in layout else 1
                assert mapped == {"engine": 2 * shm, "api-0": shm, "api-1": shm}, layout
                assert "mtserve_rows_spilled_total 0.0" in httpx.get(url + "/metrics").text
    assert answers[("0",)] == answers[("2",)] == answers[("2", "--rows-shm-mb", "0")]


def test_every_process_runs_the_supervisors_code(tiny_bundle, tmp_path):
    """Started with ``-P`` from a directory that holds another ``service`` package (as a benchmark starts
    a baseline tree), the engine and API processes import the modules the supervisor imported."""
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "__init__.py").write_text("raise ImportError('the working directory')\n")
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root)}
    args = ("--workers", "1", "--log-level", "warning", "--emulate-device-ms", "1")
    bundle = Path(tiny_bundle).resolve()
    with serve(bundle, *args, env=env, python_flags=["-P"], cwd=tmp_path) as (proc, url, _):
        r = httpx.post(url + "/predict/digits", content=png(0), headers={"content-type": "image/png"})
        assert r.status_code == 200
        for pid in children(proc.pid).values():
            assert "-P" in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_bind_gives_each_api_process_a_socket_on_one_port():
    """``--port 0``: the first socket picks the port, the others join it; a port taken by another
    server (another mtserve's sockets too, which SO_REUSEPORT alone would join) fails the whole bind
    and leaves nothing open."""
    from service.settings import Settings
    from service.supervisor import bind

    socks = bind(Settings(bundle=Path("b"), host="127.0.0.1", port=0), 3)
    try:
        ports = {s.getsockname()[1] for s in socks}
        assert len(socks) == 3 and len(ports) == 1
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in socks)
        with pytest.raises(OSError):  # taken without SO_REUSEPORT by someone else
            other = socket.create_server(("127.0.0.1", 0))
            try:
                bind(Settings(bundle=Path("b"), host="127.0.0.1", port=other.getsockname()[1]), 2)
            finally:
                other.close()
        with pytest.raises(OSError):  # taken by another server's sockets: not joined
            bind(Settings(bundle=Path("b"), host="127.0.0.1", port=ports.pop()), 2)
    finally:
        for s in socks:
            s.close()


def test_without_so_reuseport_the_api_processes_share_one_socket(tiny_bundle, tmp_path, monkeypatch):
    """A system that refuses ``SO_REUSEPORT``: bind gives one socket, and a server with two API
    processes still starts on it, answers, and says why in its log."""
    import service.supervisor as supervisor
    from service.settings import Settings

    monkeypatch.setattr(supervisor, "reuse_port_works", lambda family: False)
    socks = supervisor.bind(Settings(bundle=Path("b"), host="127.0.0.1", port=0), 3)
    assert len(socks) == 1
    socks[0].close()

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import socket\ndel socket.SO_REUSEPORT\n")
    env = {"PYTHONPATH": str(site)}
    with serve(tiny_bundle, "--workers", "2", env=env) as (proc, url, log):
        assert set(children(proc.pid)) == {"engine", "api-0", "api-1"}
        headers = {"content-type": "image/png"}
        r = httpx.post(url + "/predict/digits", content=png(1), headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        assert "SO_REUSEPORT is not available" in log.read_text()


def test_rows_that_do_not_fit_the_shared_memory_travel_on_the_socket_and_answer_the_same(tiny_bundle):
    """``--rows-shm-mb 1``: a request of 64 rows (768 KiB) fills most of its API process's arena, so
    requests sent together spill to the socket (counted in ``mtserve_rows_spilled_total``); each
    still gets exactly the answer it gets alone (through shared memory)."""
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(64, 3, 32, 32)).astype("<f4") for _ in range(4)]

    def infer(client: httpx.Client | httpx.AsyncClient, x: np.ndarray):
        spec = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
        spec["parameters"] = {"binary_data_size": x.nbytes}
        header = json.dumps({"inputs": [spec], "outputs": [{"name": "probabilities"}]}).encode()
        headers = {"inference-header-content-length": str(len(header))}
        headers["content-type"] = "application/octet-stream"
        return client.post("/v2/models/digits/infer", content=header + x.tobytes(), headers=headers)

    args = ("--workers", "1", "--rows-shm-mb", "1", "--threads", "1", "--log-level", "warning")
    with serve(tiny_bundle, *args, "--max-batch-size", "64") as (_proc, url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            alone = [infer(client, x) for x in xs]  # one at a time: each fits
            assert metric(client.get("/metrics").text, "mtserve_rows_spilled_total") == 0.0

        async def together() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                return await asyncio.gather(*(infer(client, x) for x in xs * 3))

        sent = asyncio.run(together())
        spilled = metric(httpx.get(url + "/metrics").text, "mtserve_rows_spilled_total")
    assert all(r.status_code == 200 for r in alone + sent), [
        r.text for r in alone + sent if r.status_code != 200
    ]
    assert spilled >= 1
    for i, r in enumerate(sent):
        assert r.json()["outputs"] == alone[i % 4].json()["outputs"], i
