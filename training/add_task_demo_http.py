"""The add-task demo's side of HTTP: the load generator, the answers on fixed inputs, the checks on
the served model, and the server's memory (every process of its tree, from /proc).

Imports no ``service`` module (training/ never does): it talks to the server over HTTP only.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

TOKEN = "add-task-demo-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (the server may run an engine process and API processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            todo += [int(c) for c in children]
    return out


def tree_rss(pid: int) -> dict[int, int]:
    """RSS of every process of the server's tree, by pid."""
    out = {}
    for p in process_tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            out[p] = rss_bytes(p)
    return out


def png_bytes(path: Path | None, seed: int, size: int) -> bytes:
    if path is not None:
        return path.read_bytes()
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def val_images(root: Path, per_class: int) -> list[tuple[Path, str]]:
    out = []
    for cls in sorted(p for p in (root / "val").iterdir() if p.is_dir()):
        out += [(f, cls.name) for f in sorted(cls.iterdir())[:per_class]]
    return out


class Load:
    """Closed-loop clients with a pause, in a thread of their own; every answer recorded."""

    def __init__(self, url: str, tasks: list[str], bodies: dict[str, bytes], clients: int, pause_s: float):
        self.url, self.tasks, self.bodies = url, list(tasks), bodies
        self.clients, self.pause_s = clients, pause_s
        self.results: list[tuple[float, float, str, int, str]] = []  # sent, answered, task, code, version
        self.stop = threading.Event()
        self.new_task: str | None = None  # sent too once /tasks lists it
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _worker(self, client: httpx.AsyncClient, w: int) -> None:
        i = 0
        while not self.stop.is_set():
            tasks = self.tasks + ([self.new_task] if self.new_task else [])
            task = tasks[(w + i) % len(tasks)]
            body = self.bodies.get(task) or self.bodies["*"]
            sent = time.monotonic()
            try:
                r = await client.post(f"/predict/{task}", content=body, headers={"content-type": "image/png"})
                code, version = (
                    r.status_code,
                    (r.json().get("model_version", "?") if r.status_code == 200 else r.text),
                )
            except httpx.HTTPError as exc:
                code, version = -1, f"{type(exc).__name__}: {exc}"
            self.results.append((sent, time.monotonic(), task, code, version))
            i += 1
            await asyncio.sleep(self.pause_s)

    async def _main(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            await asyncio.gather(*(self._worker(client, w) for w in range(self.clients)))


def v2_body(x: np.ndarray) -> dict:
    return {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }


def answers(client: httpx.Client, tasks: list[str], tensors: np.ndarray, pngs: list[bytes]) -> dict[str, Any]:
    """Every task's answers on the fixed inputs: /v2 probabilities (FP32 as JSON floats) and /predict."""
    out: dict[str, Any] = {}
    for t in tasks:
        r = client.post(f"/v2/models/{t}/infer", json=v2_body(tensors))
        r.raise_for_status()
        probs = r.json()["outputs"][0]["data"]
        preds = []
        for body in pngs:
            p = client.post(f"/predict/{t}?top_k=3", content=body, headers={"content-type": "image/png"})
            p.raise_for_status()
            preds.append(p.json()["predictions"])
        out[t] = {"v2": probs, "predict": preds}
    return out


def request_mix(
    client: httpx.Client, tasks: list[str], bodies: dict[str, bytes], size: list[int], rows=(1, 3, 8)
) -> None:
    """Every kind of request the demo sends, on every task of ``tasks``: ``/v2`` FP32 tensors of
    ``rows`` rows (multi-row included), ``/predict`` with and without ``top_k``. Served before each
    memory reading, so that what their first use costs once (code paths, buffers and caches of the
    serving path) is paid before the first reading too, not counted as the add's growth; the new
    task's own first requests come after the add and stay counted."""
    rng = np.random.default_rng(1)
    for t in tasks:
        for n in rows:
            x = rng.standard_normal((n, *size)).astype(np.float32)
            client.post(f"/v2/models/{t}/infer", json=v2_body(x)).raise_for_status()
        for query in ("", "?top_k=1", "?top_k=3"):
            r = client.post(f"/predict/{t}{query}", content=bodies[t], headers={"content-type": "image/png"})
            r.raise_for_status()


def steady_state(
    client: httpx.Client, tasks: list[str], bodies: dict[str, bytes], n: int = 400, clients: int = 2
) -> None:
    """``n`` requests over ``tasks`` from ``clients`` concurrent keep-alive clients (the load's pattern),
    then what a deployment polls (/metrics, /readyz, /tasks, /admin/model), before measuring memory:
    the serving path's threads and caches and the routes' lazily built state (about 1 MiB on their
    first call) are then in both readings, as in any server that has served a while and been
    scraped, not in the growth."""

    async def run() -> None:
        sent = 0
        async with httpx.AsyncClient(base_url=client.base_url, timeout=30) as ac:

            async def one_client() -> None:
                nonlocal sent
                while sent < n:
                    t = tasks[sent % len(tasks)]
                    sent += 1
                    await ac.post(f"/predict/{t}", content=bodies[t], headers={"content-type": "image/png"})

            await asyncio.gather(*(one_client() for _ in range(clients)))

    asyncio.run(run())
    for path in ("/metrics", "/readyz", "/tasks", "/admin/model"):
        client.get(path, headers=AUTH)


def served_correct(client: httpx.Client, task: str, images: list[tuple[Path, str]]) -> int:
    """How many of ``images`` the server labels right (top-1)."""
    served = 0
    for f, label in images:
        r = client.post(
            f"/predict/{task}?top_k=1", content=f.read_bytes(), headers={"content-type": "image/png"}
        )
        r.raise_for_status()
        served += r.json()["predictions"][0]["top_k"][0]["label"] == label
    return served


def routes(client: httpx.Client, task: str) -> dict[str, Any]:
    """The new task in /tasks, /v2 and /metrics; /admin/model and the engine's readiness."""
    tasks_route = client.get("/tasks").json()
    v2_meta = client.get(f"/v2/models/{task}")
    v2_ready = client.get(f"/v2/models/{task}/ready")
    metrics = client.get("/metrics").text
    admin = client.get("/admin/model", headers=AUTH).json()
    readyz = client.get("/readyz").json()
    return {
        "in_tasks_route": task in [t["name"] for t in tasks_route["tasks"]],
        "in_v2": v2_meta.status_code == 200 and v2_ready.status_code == 200,
        "in_metrics": f'task="{task}"' in metrics,
        "admin_model": admin,
        "readyz_engine": readyz.get("engine", readyz),
    }
