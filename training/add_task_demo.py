"""The issue-14 demo measurement: add a task to a RUNNING server under load.

    python -m training.add_task_demo --bundle bundles/demo --task fashion \
        --data data/mdb/fashion --out results/add-task/demo.json

1. copies BUNDLE to WORK/models/v1 and starts ``mtserve serve`` on it (127.0.0.1, admin token);
2. records every old task's answers on fixed inputs (``/v2`` FP32 tensors and ``/predict`` PNGs);
3. starts a load generator (closed-loop clients with a pause, old tasks; the new task as soon as
   ``/tasks`` lists it) that runs until the end;
4. runs ``mtserve add-task`` (a subprocess, training included) into WORK/models/v2, then
   ``POST /admin/reload {"bundle": "v2"}``;
5. checks: no failed request, the old tasks' answers bit-identical, the new task in ``/tasks``,
   ``/v2`` and ``/metrics``, its served top-1 on its val images; resident memory of the server
   before and after vs the new files' size.

Imports no ``service`` module (training/ never does): it talks to the server over HTTP only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("bundles/demo"))
    ap.add_argument("--task", default="fashion")
    ap.add_argument("--data", type=Path, required=True, help="the new task's ImageFolder root")
    ap.add_argument("--out", type=Path, required=True, help="results JSON")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mtserve-add-task-demo"))
    ap.add_argument("--steps", type=int, default=None, help="add-task --steps (default: add-task's)")
    ap.add_argument(
        "--add-args", default="--threads 1", help="more add-task arguments (default '--threads 1')"
    )
    ap.add_argument(
        "--nice", type=int, default=10, help="add-task's niceness: serving keeps priority (default 10)"
    )
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--pause-ms", type=float, default=100.0)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--eval-per-class", type=int, default=20, help="served top-1 on N val images per class")
    args = ap.parse_args(argv)

    work = args.work
    if work.exists():
        shutil.rmtree(work)
    models = work / "models"
    shutil.copytree(args.bundle, models / "v1")
    manifest = json.loads((models / "v1" / "manifest.json").read_text())
    old_tasks = list(manifest["tasks"])
    size = manifest["input"]["size"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "server.log"
    env = os.environ | {"PYTHONUNBUFFERED": "1", "MTSERVE_ADMIN_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "service.cli", "serve", str(models / "v1"), "--host", "127.0.0.1",
           "--port", str(port), "--threads", str(args.server_threads)]  # fmt: skip
    with log.open("w") as f:
        server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    result: dict[str, Any] = {"command": "python -m training.add_task_demo " + " ".join(argv or sys.argv[1:])}
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server never ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        client = httpx.Client(base_url=url, timeout=60)
        rng = np.random.default_rng(0)
        tensors = rng.standard_normal((3, *size)).astype(np.float32)
        demo_data = ROOT / "data" / "demo"
        pngs, bodies = [], {"*": png_bytes(None, 0, size[-1])}
        for i, t in enumerate(old_tasks):
            files = sorted((demo_data / t / "val").glob("*/*.png"))[:2] if (demo_data / t).is_dir() else []
            pngs += [png_bytes(f, i, size[-1]) for f in files] or [png_bytes(None, i, size[-1])]
            bodies[t] = pngs[-1]
        fashion_val = val_images(args.data, args.eval_per_class)
        bodies[args.task] = fashion_val[0][0].read_bytes()
        before = answers(client, old_tasks, tensors, pngs)
        for i in range(60):  # steady state before measuring memory
            t = old_tasks[i % len(old_tasks)]
            client.post(f"/predict/{t}", content=bodies[t], headers={"content-type": "image/png"})
        rss0 = tree_rss(server.pid)

        load = Load(url, old_tasks, bodies, args.clients, args.pause_ms / 1000)
        load.thread.start()
        time.sleep(3.0)
        t0 = time.monotonic()
        add_cmd = [sys.executable, "-m", "service.cli", "add-task", str(models / "v1"), "--task", args.task,
                   "--data", str(args.data), "--out", str(models / "v2"), "--json", str(work / "add.json"),
                   "--no-progress"]  # fmt: skip
        if args.steps:
            add_cmd += ["--steps", str(args.steps)]
        add_cmd += args.add_args.split()
        nice = args.nice
        add = subprocess.run(
            add_cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        (work / "add-task.log").write_text(add.stdout + add.stderr)
        if add.returncode != 0:
            raise RuntimeError(f"add-task failed:\n{add.stdout[-2000:]}\n{add.stderr[-3000:]}")
        t1 = time.monotonic()
        reload = client.post("/admin/reload", json={"bundle": "v2"}, headers=AUTH, timeout=300)
        t2 = time.monotonic()
        if reload.status_code != 200:
            raise RuntimeError(f"reload refused: {reload.status_code} {reload.text}")
        load.new_task = args.task
        time.sleep(3.0)
        load.stop.set()
        load.thread.join(timeout=60)

        after = answers(client, old_tasks, tensors, pngs)
        identical = {t: before[t] == after[t] for t in old_tasks}
        served = 0
        for f, label in fashion_val:
            r = client.post(
                f"/predict/{args.task}?top_k=1", content=f.read_bytes(), headers={"content-type": "image/png"}
            )
            r.raise_for_status()
            served += r.json()["predictions"][0]["top_k"][0]["label"] == label
        for i in range(60):  # the same steady state (the new task was just served above)
            t = old_tasks[i % len(old_tasks)]
            client.post(f"/predict/{t}", content=bodies[t], headers={"content-type": "image/png"})
        rss1 = tree_rss(server.pid)
        tasks_route = client.get("/tasks").json()
        v2_meta = client.get(f"/v2/models/{args.task}")
        v2_ready = client.get(f"/v2/models/{args.task}/ready")
        metrics = client.get("/metrics").text
        admin = client.get("/admin/model", headers=AUTH).json()
        readyz = client.get("/readyz").json()

        new_manifest = json.loads((models / "v2" / "manifest.json").read_text())
        old_files = {v["file"]: v["sha256"] for s in manifest["segments"] for v in s["variants"].values()}
        new_files = {v["file"]: v["sha256"] for s in new_manifest["segments"] for v in s["variants"].values()}
        added_files = {f: (models / "v2" / f).stat().st_size for f in new_files if f not in old_files}
        codes: dict[str, int] = {}
        for *_, code, _v in load.results:
            codes[str(code)] = codes.get(str(code), 0) + 1
        during_add = [r for r in load.results if r[0] < t1 and r[1] > t0]
        during_reload = [r for r in load.results if r[0] < t2 and r[1] > t1]
        failed = [r for r in load.results if r[3] != 200]
        failed_reload = [r for r in during_reload if r[3] != 200]
        new_bytes = sum(added_files.values())
        add_summary = json.loads((work / "add.json").read_text())
        result |= {
            "bundle": str(args.bundle),
            "task": args.task,
            "cpus": os.cpu_count(),
            "add_task_nice": args.nice,
            "load": {"clients": args.clients, "pause_ms": args.pause_ms},
            "sched_affinity": len(os.sched_getaffinity(0)),
            "loadavg_1m_at_end": os.getloadavg()[0],
            "add_task_s": round(t1 - t0, 2),
            "reload_s": round(t2 - t1, 2),
            "total_s": round(t2 - t0, 2),
            "under_5_minutes": (t2 - t0) < 300,
            "reload": reload.json(),
            "add_task": add_summary,
            "requests": {
                "total": len(load.results),
                "during_add_task": len(during_add),
                "during_reload": len(during_reload),
                "new_task_requests": sum(1 for r in load.results if r[2] == args.task),
                "codes": codes,
                "failed": len(failed),
                "failed_during_reload": len(failed_reload),
                "failed_examples": [list(r) for r in failed[:5]],
            },
            "other_tasks_bit_identical": identical,
            "unchanged_files_same_sha256": all(new_files[f] == h for f, h in old_files.items()),
            "new_files_bytes": added_files,
            "rss_before_bytes": rss0,  # pid -> bytes, every process of the server
            "rss_after_bytes": rss1,
            "rss_growth_bytes": sum(rss1.values()) - sum(rss0.values()),
            "rss_growth_by_pid": {p: rss1.get(p, 0) - rss0.get(p, 0) for p in rss0 | rss1},
            "rss_growth_over_new_files": (
                round((sum(rss1.values()) - sum(rss0.values())) / new_bytes, 3) if new_bytes else None
            ),
            "new_task_served_top1": served / len(fashion_val),
            "new_task_served_images": len(fashion_val),
            "in_tasks_route": args.task in [t["name"] for t in tasks_route["tasks"]],
            "in_v2": v2_meta.status_code == 200 and v2_ready.status_code == 200,
            "in_metrics": f'task="{args.task}"' in metrics,
            "admin_model": admin,
            "readyz_engine": readyz.get("engine", readyz),
        }
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        result["server_log_tail"] = [
            line for line in log.read_text().splitlines() if "reload" in line or "engine ready" in line
        ][-10:]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    r, q = result, result["requests"]
    mib = sum(r["new_files_bytes"].values()) / 2**20
    print(
        f"{r['task']} added to the running server in {r['total_s']:.0f} s (add-task {r['add_task_s']:.0f} s, "
        f"reload {r['reload_s']:.1f} s); {q['total']} requests, {q['failed']} failed; other tasks "
        f"bit-identical: {all(r['other_tasks_bit_identical'].values())}; RSS "
        f"{r['rss_growth_bytes'] / 2**20:+.1f} MiB for {mib:.2f} MiB of new files; "
        f"served top-1 {r['new_task_served_top1']:.3f} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
