"""A real ``mtserve serve`` process on 127.0.0.1 for end-to-end tests (no tests here)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.bench.server import free_port
from service.metrics import MULTIPROCESS_FLUSH_S

ROOT = Path(__file__).resolve().parents[1]
# with --workers N a scrape sees another process's updates once they are at most this old
METRICS_LAG_S = 3 * MULTIPROCESS_FLUSH_S


def png(seed: int) -> bytes:
    """A random RGB PNG whose height depends on the seed (so requests differ in size)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (30 + seed, 44, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def wait_ready(proc: subprocess.Popen, url: str, log: Path, limit_s: float = 90.0) -> httpx.Response:
    """Poll ``/readyz`` until 200; fail with the server's log if it exits or never gets ready."""
    deadline = time.monotonic() + limit_s
    while True:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()}"
        try:
            ready = httpx.get(url + "/readyz", timeout=1)
            if ready.status_code == 200:
                return ready
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"server never became ready:\n{log.read_text()}"
        time.sleep(0.1)


@contextlib.contextmanager
def serve(
    bundle: str | Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    python_flags: Sequence[str] = (),
    cwd: Path = ROOT,
) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """``mtserve serve BUNDLE --host 127.0.0.1 --port <free> ARGS``; yields (process, base URL, log file)
    once ``/readyz`` is 200. Output goes to ``log`` (a temporary file by default), never to a pipe
    that could fill up. On exit a process still running is terminated (killed after 20 s)."""
    port = free_port()
    cmd = [sys.executable, *python_flags, "-m", "service.cli", "serve", str(bundle), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), *args]
    if log is None:
        log = Path(tempfile.mkstemp(prefix="mtserve-", suffix=".log")[1])
    full_env = os.environ | {"PYTHONUNBUFFERED": "1"} | dict(env or {})
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log)
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
