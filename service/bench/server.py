"""Server processes for the scenarios: `mtserve serve` and the LitServe peer, on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def wait_ready(proc: subprocess.Popen, port: int, path: str, limit: float) -> None:
    """Poll ``path`` until 200; fail if the process exits or ``limit`` seconds pass."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        with contextlib.suppress(OSError):
            if get(port, path)[0] == 200:
                return
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready after {limit:.0f} s")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for c in map(int, task.read_text().split()):
                out += [c, *_children(c)]
    return out


def _vmrss(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes(pid: int, children: bool = True) -> int:
    """Resident memory of a process and its descendants (LitServe runs its model in a worker), from
    /proc (Linux), the same figure psutil's ``memory_info().rss`` reports."""
    return sum(_vmrss(p) for p in [pid, *(_children(pid) if children else [])])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _env() -> dict[str, str]:
    """The repo first on the children's path, the caller's PYTHONPATH kept."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.environ | {"PYTHONPATH": os.pathsep.join(paths)}


@contextlib.contextmanager
def running(
    cmd: Sequence[str],
    port: int,
    ready_path: str = "/readyz",
    ready_s: float = 300.0,
    env: Mapping[str, str] | None = None,
    halt: Callable[[subprocess.Popen], None] = stop,
    **popen,
) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` (from the repo root, the repo on its path, ``env`` added) and yield the process once
    ``ready_path`` on ``port`` answers 200; ``halt`` it afterwards."""
    proc = subprocess.Popen(list(cmd), cwd=ROOT, env=_env() | dict(env or {}), **popen)
    try:
        wait_ready(proc, port, ready_path, ready_s)
        yield proc
    finally:
        halt(proc)


@contextlib.contextmanager
def mtserve(
    bundle: str | Path,
    threads: int | None,
    extra: Sequence[str] = (),
    ready_s: float = 300.0,
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[int, subprocess.Popen]]:
    """`mtserve serve BUNDLE` on a free loopback port; yields (port, process) once /readyz is 200.
    ``threads`` None: the server's default."""
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", str(bundle), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), *(() if threads is None else ("--threads", str(threads)))]
    cmd += ["--queue-size", "100000", "--log-level", "warning", *extra]
    with running(cmd, port, "/readyz", ready_s, env) as proc:
        yield port, proc


@contextlib.contextmanager
def litserve_peer(
    bundle: str | Path, threads: int, max_batch_size: int, batch_timeout_ms: float, ready_s: float = 300.0
) -> Iterator[tuple[int, subprocess.Popen]]:
    """The LitServe peer (service/bench/peer_litserve.py) on a free port, once /health is 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "service.bench.peer_litserve", str(bundle), "--port", str(port)]
    cmd += ["--threads", str(threads), "--max-batch-size", str(max_batch_size)]
    cmd += ["--batch-timeout-ms", str(batch_timeout_ms)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with running(cmd, port, "/health", ready_s, halt=_stop_group, start_new_session=True, **quiet) as proc:
        yield port, proc


def _stop_group(proc: subprocess.Popen) -> None:
    """LitServe forks API-server and inference workers: stop the whole (own) process group."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def scrape_batches(port: int) -> dict:
    """Shared-trunk batch statistics from /metrics (cumulative counters)."""
    import re

    text = get(port, "/metrics")[1].decode()

    def val(name: str) -> float:
        m = re.search("^" + re.escape(name) + r" (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    trunk = 'segment="trunk"'
    return {
        "batches": val("mtserve_batch_tasks_count"),
        "tasks_sum": val("mtserve_batch_tasks_sum"),
        "single_task": val('mtserve_batch_tasks_bucket{le="1.0"}'),
        "rows": val(f"mtserve_batch_size_sum{{{trunk}}}"),
        "calls": val(f"mtserve_batch_size_count{{{trunk}}}"),
        "engine_s": sum(
            float(v) for v in re.findall(r"^mtserve_segment_duration_seconds_sum\{[^}]*\} (\S+)$", text, re.M)
        ),
    }


def batch_delta(before: dict, after: dict, seconds: float | None = None) -> dict:
    """Trunk calls and mean batch between two scrapes; with ``seconds`` (the time between them) also
    the share of shared-trunk batches that mixed tasks and the share of wall time inside onnxruntime."""
    d = {k: after[k] - before[k] for k in before}
    out = {
        "trunk_calls": int(d["calls"]),
        "mean_trunk_batch": round(d["rows"] / d["calls"], 2) if d["calls"] else 0.0,
        "mean_tasks_per_batch": round(d["tasks_sum"] / d["batches"], 2) if d["batches"] else 0.0,
    }
    if seconds:
        mixed = d["batches"] - d["single_task"]
        out["mixed_share"] = round(mixed / d["batches"], 3) if d["batches"] else 0.0
        out["engine_busy_share"] = round(d["engine_s"] / seconds, 3)
    return out


def dump(obj) -> str:
    return json.dumps(obj, indent=2)
