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

The two memory readings are taken in the same steady state: before each, the server serves
``--rounds`` rounds (3) of the same traffic mix (every request kind the demo sends, multi-row ``/v2``
included: ``request_mix``; then 400 ``/predict`` from 2 clients and a scrape: ``steady_state``), on
the old tasks before the add and on every task after it, and the RSS is read after each round. What
a request kind costs on its first uses is thus paid before the first reading; the growth is what
the add itself costs, the new task's own traffic (its first requests, its series, its sessions' run
state) and the reload (the server's first) included.

Imports no ``service`` module (training/ never does): it talks to the server over HTTP only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from training.add_task_demo_http import (
    AUTH,
    TOKEN,
    Load,
    answers,
    free_port,
    png_bytes,
    request_mix,
    routes,
    served_correct,
    steady_state,
    tree_rss,
    val_images,
)

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    ap.add_argument("--server-workers", help="mtserve serve --workers (default: the server's, auto)")
    ap.add_argument(
        "--steady-requests", type=int, default=400, help="requests served before each memory reading"
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds of the traffic mix before each memory reading (3)"
    )
    ap.add_argument("--eval-per-class", type=int, default=20, help="served top-1 on N val images per class")
    return ap.parse_args(argv)


@dataclass
class Setup:
    """The demo's folders, the served bundle v1 and the server's address."""

    work: Path
    models: Path
    manifest: dict[str, Any]
    url: str
    log: Path

    @property
    def old_tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    @property
    def size(self) -> list[int]:
        return self.manifest["input"]["size"]


def prepare(args: argparse.Namespace) -> Setup:
    """A fresh work folder with the bundle copied to models/v1."""
    work = args.work
    if work.exists():
        shutil.rmtree(work)
    models = work / "models"
    shutil.copytree(args.bundle, models / "v1")
    manifest = json.loads((models / "v1" / "manifest.json").read_text())
    return Setup(work, models, manifest, f"http://127.0.0.1:{free_port()}", work / "server.log")


def start_server(args: argparse.Namespace, setup: Setup) -> subprocess.Popen:
    env = os.environ | {"PYTHONUNBUFFERED": "1", "MTSERVE_ADMIN_TOKEN": TOKEN}
    port = setup.url.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "service.cli", "serve", str(setup.models / "v1"), "--host", "127.0.0.1",
           "--port", port, "--threads", str(args.server_threads)]  # fmt: skip
    if args.server_workers is not None:
        cmd += ["--workers", args.server_workers]
    with setup.log.open("w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def wait_ready(server: subprocess.Popen, setup: Setup, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"server exited:\n{setup.log.read_text()[-3000:]}")
        try:
            if httpx.get(setup.url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server never ready:\n{setup.log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_server(server: subprocess.Popen, setup: Setup) -> list[str]:
    """Stop the server; the reload and ready lines of its log."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return [
        line for line in setup.log.read_text().splitlines() if "reload" in line or "engine ready" in line
    ][-10:]


@dataclass
class Inputs:
    """Fixed inputs: /v2 tensors and /predict PNGs of the old tasks, a request body per task, the new
    task's val images."""

    tensors: np.ndarray
    pngs: list[bytes]
    bodies: dict[str, bytes]
    new_val: list[tuple[Path, str]]


def fixed_inputs(args: argparse.Namespace, setup: Setup) -> Inputs:
    size = setup.size
    rng = np.random.default_rng(0)
    tensors = rng.standard_normal((3, *size)).astype(np.float32)
    demo_data = ROOT / "data" / "demo"
    pngs, bodies = [], {"*": png_bytes(None, 0, size[-1])}
    for i, t in enumerate(setup.old_tasks):
        files = sorted((demo_data / t / "val").glob("*/*.png"))[:2] if (demo_data / t).is_dir() else []
        pngs += [png_bytes(f, i, size[-1]) for f in files] or [png_bytes(None, i, size[-1])]
        bodies[t] = pngs[-1]
    new_val = val_images(args.data, args.eval_per_class)
    bodies[args.task] = new_val[0][0].read_bytes()
    return Inputs(tensors, pngs, bodies, new_val)


def run_add_task(args: argparse.Namespace, setup: Setup) -> None:
    """``mtserve add-task`` into models/v2, a subprocess at lower priority (its log in the work folder)."""
    models, work = setup.models, setup.work
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


@dataclass
class Timeline:
    """When add-task started (t0) and ended (t1), and when the reload answered (t2); monotonic."""

    t0: float
    t1: float
    t2: float
    reload: dict[str, Any]


def add_and_reload(args: argparse.Namespace, setup: Setup, client: httpx.Client, load: Load) -> Timeline:
    """Under load: add the task, reload onto v2, send the new task too for 3 s, stop the load."""
    load.thread.start()
    time.sleep(3.0)
    t0 = time.monotonic()
    run_add_task(args, setup)
    t1 = time.monotonic()
    reload = client.post("/admin/reload", json={"bundle": "v2"}, headers=AUTH, timeout=300)
    t2 = time.monotonic()
    if reload.status_code != 200:
        raise RuntimeError(f"reload refused: {reload.status_code} {reload.text}")
    load.new_task = args.task
    time.sleep(3.0)
    load.stop.set()
    load.thread.join(timeout=60)
    return Timeline(t0, t1, t2, reload.json())


def request_stats(load: Load, task: str, tl: Timeline) -> dict[str, Any]:
    codes: dict[str, int] = {}
    for *_, code, _v in load.results:
        codes[str(code)] = codes.get(str(code), 0) + 1
    during_add = [r for r in load.results if r[0] < tl.t1 and r[1] > tl.t0]
    during_reload = [r for r in load.results if r[0] < tl.t2 and r[1] > tl.t1]
    failed = [r for r in load.results if r[3] != 200]
    return {
        "total": len(load.results),
        "during_add_task": len(during_add),
        "during_reload": len(during_reload),
        "new_task_requests": sum(1 for r in load.results if r[2] == task),
        "codes": codes,
        "failed": len(failed),
        "failed_during_reload": sum(1 for r in during_reload if r[3] != 200),
        "failed_examples": [list(r) for r in failed[:5]],
    }


def file_and_memory_stats(setup: Setup, rss0: dict[int, int], rss1: dict[int, int]) -> dict[str, Any]:
    """The new bundle's files vs the old (same sha256, new bytes) and the server's RSS growth."""
    new_manifest = json.loads((setup.models / "v2" / "manifest.json").read_text())
    old_files = {v["file"]: v["sha256"] for s in setup.manifest["segments"] for v in s["variants"].values()}
    new_files = {v["file"]: v["sha256"] for s in new_manifest["segments"] for v in s["variants"].values()}
    added_files = {f: (setup.models / "v2" / f).stat().st_size for f in new_files if f not in old_files}
    new_bytes = sum(added_files.values())
    growth = sum(rss1.values()) - sum(rss0.values())
    return {
        "unchanged_files_same_sha256": all(new_files[f] == h for f, h in old_files.items()),
        "new_files_bytes": added_files,
        "rss_before_bytes": rss0,  # pid -> bytes, every process of the server
        "rss_after_bytes": rss1,
        "rss_growth_bytes": growth,
        "rss_growth_by_pid": {p: rss1.get(p, 0) - rss0.get(p, 0) for p in rss0 | rss1},
        "rss_growth_over_new_files": round(growth / new_bytes, 3) if new_bytes else None,
    }


def mix_rounds(
    args: argparse.Namespace,
    client: httpx.Client,
    tasks: list[str],
    inputs: Inputs,
    setup: Setup,
    server: subprocess.Popen,
) -> list[dict[int, int]]:
    """``--rounds`` rounds of the traffic mix (every request kind, then the steady load and a scrape),
    the server's RSS by process read after each: the last is the reading, the rounds before it show
    whether serving alone still moves it (a multi-row request's transient objects take fresh memory
    on its first uses, until the process's allocators hold its high-water mark)."""
    out = []
    for _ in range(args.rounds):
        request_mix(client, tasks, inputs.bodies, setup.size)
        steady_state(client, tasks, inputs.bodies, args.steady_requests, args.clients)
        time.sleep(1.5)  # what a version's close or a heap trim frees is freed
        out.append(tree_rss(server.pid))
    return out


def measure(args: argparse.Namespace, setup: Setup, server: subprocess.Popen) -> dict[str, Any]:
    """The demo against the running server: answers before, add + reload under load, checks after."""
    wait_ready(server, setup)
    client = httpx.Client(base_url=setup.url, timeout=60)
    old_tasks, inputs = setup.old_tasks, fixed_inputs(args, setup)
    before = answers(client, old_tasks, inputs.tensors, inputs.pngs)
    # the traffic mix served after the add, on the old tasks: first-use costs paid before reading
    rounds0 = mix_rounds(args, client, old_tasks, inputs, setup, server)
    rss0 = rounds0[-1]
    load = Load(setup.url, old_tasks, inputs.bodies, args.clients, args.pause_ms / 1000)
    tl = add_and_reload(args, setup, client, load)
    after = answers(client, old_tasks, inputs.tensors, inputs.pngs)
    served = served_correct(client, args.task, inputs.new_val)
    # the same rounds of the traffic mix, the new task included
    rounds1 = mix_rounds(args, client, [*old_tasks, args.task], inputs, setup, server)
    rss1 = rounds1[-1]
    checks = routes(client, args.task)
    return {
        "bundle": str(args.bundle),
        "task": args.task,
        "cpus": os.cpu_count(),
        "add_task_nice": args.nice,
        "load": {"clients": args.clients, "pause_ms": args.pause_ms},
        "sched_affinity": len(os.sched_getaffinity(0)),
        "loadavg_1m_at_end": os.getloadavg()[0],
        "add_task_s": round(tl.t1 - tl.t0, 2),
        "reload_s": round(tl.t2 - tl.t1, 2),
        "total_s": round(tl.t2 - tl.t0, 2),
        "under_5_minutes": (tl.t2 - tl.t0) < 300,
        "reload": tl.reload,
        "add_task": json.loads((setup.work / "add.json").read_text()),
        "requests": request_stats(load, args.task, tl),
        "other_tasks_bit_identical": {t: before[t] == after[t] for t in old_tasks},
        **file_and_memory_stats(setup, rss0, rss1),
        "rss_rounds_before_bytes": [sum(r.values()) for r in rounds0],  # after each round, all processes
        "rss_rounds_after_bytes": [sum(r.values()) for r in rounds1],
        "new_task_served_top1": served / len(inputs.new_val),
        "new_task_served_images": len(inputs.new_val),
        **checks,
    }


def print_summary(r: dict[str, Any], out: Path) -> None:
    q = r["requests"]
    mib = sum(r["new_files_bytes"].values()) / 2**20
    print(
        f"{r['task']} added to the running server in {r['total_s']:.0f} s (add-task {r['add_task_s']:.0f} s, "
        f"reload {r['reload_s']:.1f} s); {q['total']} requests, {q['failed']} failed; other tasks "
        f"bit-identical: {all(r['other_tasks_bit_identical'].values())}; RSS "
        f"{r['rss_growth_bytes'] / 2**20:+.1f} MiB for {mib:.2f} MiB of new files; "
        f"served top-1 {r['new_task_served_top1']:.3f} -> {out}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = prepare(args)
    server = start_server(args, setup)
    result: dict[str, Any] = {"command": "python -m training.add_task_demo " + " ".join(argv or sys.argv[1:])}
    try:
        result |= measure(args, setup, server)
    finally:
        result["server_log_tail"] = stop_server(server, setup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
