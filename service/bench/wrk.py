"""A closed-loop load driver over wrk (C, epoll) for the saturating scenarios: the cheapest client per
request measured here, about a third of hey's CPU, half to three quarters of the Python generator's
(docs/bench.md, "Load generators").

The requests to rotate through (one per task: each is sent in turn, so tasks mix uniformly) go to temp
files; a generated Lua script reads them in ``init``, pre-builds every request once with
``wrk.format``, returns them in turn from ``request`` and counts status codes in ``response``; ``done``
prints one JSON line (requests, duration, errors, latency percentiles, codes).

How a run ends: wrk's main thread sleeps for the whole ``-d`` whatever its threads do
(``wrk.thread:stop()`` ends a thread, not the run, and ``-d`` takes whole seconds only), so ``-d`` is
only an upper bound here and the driver ends a run with SIGINT, which wakes that sleep: after
``seconds``, or, for ``n_requests``, once the script has printed that every thread stopped at its share
(a counter in ``response`` + ``wrk.thread:stop()``). A count, not a duration estimated from a rate:
api-cpu divides the server's CPU seconds by the requests answered, and like ``hey -n`` every server
answers the same number. The status counter costs about 2 us per request (wrk then hands headers and
body to Lua; 0.027 -> 0.029 ms CPU per request measured, within noise), the price of exact codes.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
MARK_JSON = "@@wrk-json "
MARK_LIMIT = "@@wrk-limit"
TOOLS = ("auto", "wrk", "hey", "python")


@dataclass(frozen=True)
class Request:
    """One request to rotate through; wrk adds Host and Content-Length."""

    path: str
    body: bytes
    content_type: str
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()


def from_raw(raw: bytes) -> Request:
    """A :class:`Request` from a complete HTTP/1.1 request (``loadgen.http_post``'s bytes)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    first, *lines = head.decode("latin-1").split("\r\n")
    method, path, _ = first.split(" ", 2)
    ctype, extra = "application/octet-stream", []
    for line in lines:
        name, _, value = line.partition(":")
        key, value = name.strip().lower(), value.strip()
        if key == "content-type":
            ctype = value
        elif key not in ("host", "content-length"):
            extra.append((name.strip(), value))
    return Request(path, body, ctype, method, tuple(extra))


def pick(wanted: str = "auto", one_body: bool = True) -> str:
    """The load generator to use: ``auto`` is wrk when on PATH, else hey (only where one body is sent:
    hey cannot rotate requests), else the project's Python generator. Refuses a tool that is missing or
    that cannot send what the scenario sends."""
    if wanted not in TOOLS:
        raise ValueError(f"unknown load generator {wanted!r}; use one of {', '.join(TOOLS)}")
    if wanted == "auto":
        if shutil.which("wrk"):
            return "wrk"
        return "hey" if one_body and shutil.which("hey") else "python"
    if wanted == "hey" and not one_body:
        raise SystemExit("--loadgen hey sends one body; this scenario rotates several: use wrk or python")
    if wanted != "python" and not shutil.which(wanted):
        raise SystemExit(f"--loadgen {wanted}: {wanted} is not on PATH")
    return wanted


def _lua(s: str) -> str:
    """A Lua string literal (decimal escapes for anything but printable ASCII)."""
    out = []
    for ch in s:
        if ch in '\\"':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.extend(f"\\{b:03d}" for b in ch.encode())
    return '"' + "".join(out) + '"'


_RUNNING = """
local reqs, i, n = {}, 0, 0
codes = {}

function init(args)
  for k, s in ipairs(specs) do
    local f = assert(io.open(s.file, "rb"))
    local body = f:read("*a")
    f:close()
    reqs[k] = wrk.format(s.method, s.path, s.headers, body)
  end
end

function request()
  i = i % #reqs + 1
  return reqs[i]
end

function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
  n = n + 1
  if n == limit then
    wrk.thread:stop()
    io.write("@@wrk-limit\\n")
    io.flush()
  end
end
"""

_DONE = """
local threads = {}
function setup(thread) table.insert(threads, thread) end

function done(summary, latency, requests)
  local merged, parts = {}, {}
  for _, t in ipairs(threads) do
    for status, count in pairs(t:get("codes") or {}) do merged[status] = (merged[status] or 0) + count end
  end
  for status, count in pairs(merged) do table.insert(parts, string.format('"%d": %d', status, count)) end
  local e = summary.errors
  local p = function(q) return latency:percentile(q) / 1000.0 end
  io.write(string.format(
    '@@wrk-json {"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d}, "codes": {%s}, "latency_ms": {"p50": %.3f, "p90": %.3f, '
    .. '"p99": %.3f, "p999": %.3f, "mean": %.3f, "max": %.3f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ", "), p(50), p(90), p(99), p(99.9), latency.mean / 1000.0, latency.max / 1000.0))
end
"""


def lua_script(requests: list[Request], files: list[Path], limit: int = 0) -> str:
    """The script: ``specs`` (method, path, headers, body file per request), ``limit`` responses per
    thread before it stops (0: none), the rotation, the status counter and the JSON ``done``."""
    specs = []
    for r, f in zip(requests, files, strict=True):
        pairs = (("Content-Type", r.content_type), *r.headers)
        headers = ", ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in pairs)
        specs.append(f"  {{method = {_lua(r.method)}, path = {_lua(r.path)}, headers = {{{headers}}}, "
                     f"file = {_lua(str(f))}}},")  # fmt: skip
    head = "-- generated by service/bench/wrk.py\nlocal specs = {\n" + "\n".join(specs) + "\n}\n"
    return head + f"local limit = {int(limit)}\n" + _RUNNING + _DONE


def parse(stdout: str, connections: int | None = None) -> dict:
    """The result of a run from wrk's stdout (the script's JSON line), in the shape of
    ``loadgen.Result.summary()`` plus errors, p99.9, wall time and ``tool``."""
    line = next((s for s in stdout.splitlines() if s.startswith(MARK_JSON)), None)
    if line is None:
        raise RuntimeError(f"no result line from wrk in its output:\n{stdout[-2000:]}")
    raw = json.loads(line[len(MARK_JSON) :])
    codes = {k: raw["codes"][k] for k in sorted(raw["codes"], key=int)}
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    wall = raw["duration_us"] / 1e6
    lat, errors = raw["latency_ms"], raw["errors"]
    return {
        "tool": "wrk",
        "mode": "closed",
        "offered_rps": None,
        "throughput_rps": round(ok / wall, 1) if wall else 0.0,
        "requests": raw["requests"],
        "codes": codes,
        "non_2xx": sum(codes.values()) - ok,
        "errors": errors,
        "transport_errors": sum(v for k, v in errors.items() if k != "status"),
        "unfinished": 0,
        **{f"{k}_ms": round(v, 3) for k, v in lat.items()},
        "wall_s": round(wall, 3),
        "connections": connections,
    }


def command(
    port: int, script: Path, connections: int, threads: int = 1, timeout_s: float = 30.0, bound_s: float = 600
) -> list[str]:
    """The wrk command line: ``-d`` is only an upper bound (the driver stops the run); ``--timeout``
    counts a request that takes longer as a timeout error (and reconnects)."""
    threads = max(1, min(threads, connections))
    return [
        shutil.which("wrk") or "wrk",
        *("-t", str(threads), "-c", str(connections), "-d", f"{math.ceil(bound_s)}s"),
        *("--latency", "--timeout", f"{max(1, math.ceil(timeout_s))}s", "-s", str(script)),
        f"http://{HOST}:{port}",
    ]


def _catches_sigint(pid: int) -> bool:
    """Whether the process has installed its SIGINT handler yet (``SigCgt`` in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) & (1 << (signal.SIGINT - 1)))


def _wait_handler(proc: subprocess.Popen, wait_s: float = 10.0) -> None:
    """Until wrk has installed its SIGINT handler (before that, SIGINT would kill it unreported), it
    exits, or ``wait_s`` pass."""
    deadline = time.monotonic() + wait_s
    while proc.poll() is None and not _catches_sigint(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.001)


def _interrupt(proc: subprocess.Popen) -> None:
    """End the run: SIGINT wakes wrk's main thread, which stops the threads and reports."""
    _wait_handler(proc)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)


def execute(cmd: list[str], stop_after_s: float | None, marks: int) -> str:
    """Run wrk; end it after ``stop_after_s`` seconds (from when it can be stopped), or once ``marks``
    threads have printed that they reached their share of requests; its output (stderr included)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = None
    lines: list[str] = []
    try:
        if stop_after_s is not None:
            _wait_handler(proc)  # wrk's clock starts then
            timer = threading.Timer(stop_after_s, _interrupt, (proc,))
            timer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            marks -= line.startswith(MARK_LIMIT)
            if line.startswith(MARK_LIMIT) and marks == 0:
                _interrupt(proc)
        rc = proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        raise RuntimeError(f"wrk exited with {rc}:\n{''.join(lines)[-2000:]}")
    return "".join(lines)


def run(
    port: int,
    requests: list[Request],
    connections: int,
    seconds: float | None = None,
    n_requests: int | None = None,
    warmup_s: float = 0.0,
    threads: int = 1,
    timeout_s: float = 30.0,
    limit_s: float = 600.0,
) -> dict:
    """Closed loop on ``127.0.0.1:port``: ``connections`` keep-alive connections sending ``requests`` in
    turn for ``seconds``, or until ``n_requests`` are answered (at most ``limit_s``), after a warm-up of
    ``warmup_s`` (not counted, same connections count). See :func:`parse` for the result."""
    if (seconds is None) == (n_requests is None):
        raise ValueError("give seconds or n_requests")
    if n_requests is not None and n_requests < 1:
        raise ValueError("n_requests must be >= 1")
    threads = max(1, min(threads, connections))
    with tempfile.TemporaryDirectory(prefix="mtserve-wrk-") as tmp:
        files = [Path(tmp) / f"body-{k}.bin" for k in range(len(requests))]
        for f, r in zip(files, requests, strict=True):
            f.write_bytes(r.body)
        script = Path(tmp) / "load.lua"
        if warmup_s > 0:
            script.write_text(lua_script(requests, files))
            execute(command(port, script, connections, threads, timeout_s, warmup_s + 60), warmup_s, 0)
        limit = math.ceil(n_requests / threads) if n_requests else 0
        script.write_text(lua_script(requests, files, limit))
        cmd = command(port, script, connections, threads, timeout_s, limit_s if limit else seconds + 60)
        out = execute(cmd, seconds, threads if limit else 0)
    return parse(out, connections)
