"""service/bench/wrk.py: the generated Lua script, the parsing of wrk's output, the choice of load
generator, and one run of real wrk against a small threaded HTTP server (skipped without wrk)."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from service.bench import loadgen, wrk

# wrk 4.1.0 (Debian) against `mtserve serve bundles/demo`: 600 requests over 4 connections, rotating
# /predict/digits (200) and /predict/nope (404); the driver's stdout as it came back.
CAPTURED = """Running 10m test @ http://127.0.0.1:18431
  1 threads and 4 connections
@@wrk-limit
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.13ms    4.79ms  31.18ms   78.02%
    Req/Sec     0.87k   102.81     1.00k    66.67%
  Latency Distribution
     50%    4.85ms
     75%    7.96ms
     90%    9.97ms
     99%   24.52ms
  600 requests in 684.62ms, 206.10KB read
  Non-2xx or 3xx responses: 302
Requests/sec:    876.39
Transfer/sec:    301.05KB
@@wrk-json {"requests": 600, "duration_us": 684623, "errors": {"connect": 0, "read": 0, "write": 0, \
"status": 302, "timeout": 0}, "codes": {"404": 302, "200": 298}, "latency_ms": {"p50": 4.852, \
"p90": 9.970, "p99": 24.517, "p999": 31.181, "mean": 5.126, "max": 31.181}}
"""

REQUESTS = [
    wrk.Request("/predict/a?top_k=5", b"\x89PNG\x00\xff\r\n\r\n", "image/png"),
    wrk.Request(
        "/v2/models/b/infer", b'{"x": "\\"q\\""}', "application/octet-stream", headers=(("X-Len", "7"),)
    ),
    wrk.Request('/predict/"odd"\\path', b"", "application/json", method="PUT"),
]


def _specs(script: str) -> list[str]:
    return re.findall(r"^  \{method = .*\},$", script, re.M)


def test_lua_script_lists_every_request_in_order_with_its_body_file(tmp_path: Path) -> None:
    files = [tmp_path / f"body-{k}.bin" for k in range(3)]
    script = wrk.lua_script(REQUESTS, files, limit=7)
    specs = _specs(script)
    assert len(specs) == 3
    assert specs[0].startswith(
        '  {method = "POST", path = "/predict/a?top_k=5", headers = {["Content-Type"] = "image/png"}'
    )
    assert '["X-Len"] = "7"' in specs[1] and '"application/octet-stream"' in specs[1]
    assert 'method = "PUT", path = "/predict/\\"odd\\"\\\\path"' in specs[2]
    for spec, f in zip(specs, files, strict=True):
        assert spec.endswith(f'file = "{f}"}},')
    assert "local limit = 7\n" in script
    # bodies read as bytes once per thread, every request pre-built, then returned in turn
    assert 'io.open(s.file, "rb")' in script and 'f:read("*a")' in script
    assert "reqs[k] = wrk.format(s.method, s.path, s.headers, body)" in script
    assert re.search(r"function request\(\)\n  i = i % #reqs \+ 1\n  return reqs\[i\]\nend", script)
    # statuses counted, the thread stopped at its share, one JSON line from done()
    assert "codes[status] = (codes[status] or 0) + 1" in script
    assert "if n == limit then\n    wrk.thread:stop()" in script
    assert "@@wrk-json" in script and "latency:percentile(q)" in script and "p(99.9)" in script
    assert "local limit = 0\n" in wrk.lua_script(REQUESTS, files)


def test_lua_string_escapes() -> None:
    assert wrk._lua('a"b\\c') == '"a\\"b\\\\c"'
    assert wrk._lua("x\n1é") == '"x\\0101\\195\\169"'  # 3-digit escapes: "\0101" is "\n" then "1"


def test_parse_captured_wrk_output() -> None:
    got = wrk.parse(CAPTURED, connections=4)
    assert got["tool"] == "wrk" and got["mode"] == "closed" and got["connections"] == 4
    assert got["requests"] == 600 and got["codes"] == {"200": 298, "404": 302}
    assert got["non_2xx"] == 302 and got["errors"]["status"] == 302 and got["transport_errors"] == 0
    assert got["wall_s"] == pytest.approx(0.685, abs=1e-3)
    assert got["throughput_rps"] == pytest.approx(298 / 0.684623, abs=0.1)  # 2xx only, like loadgen
    assert (got["p50_ms"], got["p90_ms"], got["p99_ms"], got["p999_ms"]) == (4.852, 9.97, 24.517, 31.181)
    assert got["max_ms"] == 31.181 and got["unfinished"] == 0
    assert set(loadgen.Result("closed", 1.0).summary()) - {"tool"} <= set(got)  # callers' shape


def test_parse_without_result_line_raises() -> None:
    with pytest.raises(RuntimeError, match="no result line"):
        wrk.parse("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_run_writes_bodies_and_counts_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run() without wrk: the command, the script's limit and the body files as wrk would read them."""
    seen: list[tuple[list[str], float | None, int, str, list[bytes]]] = []

    def fake(cmd: list[str], stop_after_s: float | None, marks: int) -> str:
        script = Path(cmd[cmd.index("-s") + 1]).read_text()
        bodies = [Path(p).read_bytes() for p in re.findall(r'file = "([^"]+)"', script)]
        seen.append((cmd, stop_after_s, marks, script, bodies))
        return CAPTURED

    monkeypatch.setattr(wrk, "execute", fake)
    got = wrk.run(4321, REQUESTS, 8, n_requests=1000, warmup_s=0.5, timeout_s=5)
    assert got["requests"] == 600 and got["connections"] == 8
    (_, warm_stop, warm_marks, warm_script, _), (cmd, stop, marks, script, bodies) = seen
    assert warm_stop == 0.5 and warm_marks == 0 and "local limit = 0\n" in warm_script
    assert stop is None and marks == 1 and "local limit = 1000\n" in script
    assert bodies == [r.body for r in REQUESTS]
    assert cmd[1:5] == ["-t", "1", "-c", "8"] and "--latency" in cmd
    assert cmd[cmd.index("--timeout") + 1] == "5s"
    assert cmd[-1] == "http://127.0.0.1:4321"
    seen.clear()
    wrk.run(4321, REQUESTS, 8, seconds=2.5, threads=2)
    ((cmd, stop, marks, script, _),) = seen
    assert stop == 2.5 and marks == 0 and "local limit = 0\n" in script and cmd[1:3] == ["-t", "2"]
    with pytest.raises(ValueError):
        wrk.run(4321, REQUESTS, 8)


def test_from_raw_reads_loadgen_requests() -> None:
    raw = loadgen.http_post("/v2/models/t/infer", b"\x00\x01head", "application/octet-stream", {"X-A": "3"})
    assert wrk.from_raw(raw) == wrk.Request(
        "/v2/models/t/infer", b"\x00\x01head", "application/octet-stream", "POST", (("X-A", "3"),)
    )
    assert wrk.from_raw(loadgen.http_post("/p?top_k=1", b"", "image/jpeg")).content_type == "image/jpeg"


def test_pick_falls_back_and_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    have: set[str] = set()
    monkeypatch.setattr(wrk.shutil, "which", lambda name: f"/usr/bin/{name}" if name in have else None)
    assert wrk.pick("auto") == "python"
    have.add("hey")
    assert wrk.pick("auto", one_body=True) == "hey" and wrk.pick("auto", one_body=False) == "python"
    with pytest.raises(SystemExit, match="rotates several"):
        wrk.pick("hey", one_body=False)
    with pytest.raises(SystemExit, match="not on PATH"):
        wrk.pick("wrk")
    have.add("wrk")
    assert wrk.pick("auto", one_body=False) == "wrk" and wrk.pick("python") == "python"
    with pytest.raises(ValueError):
        wrk.pick("ab")


class _Target(BaseHTTPRequestHandler):
    """Keep-alive target: 200 on /a and /b, 404 elsewhere; records (path, content type, body)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    seen: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, self.headers["Content-Type"], body))
        answer = b'{"ok": true}'
        self.send_response(200 if self.path in ("/a", "/b") else 404)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # wrk drops its connections when it stops: resets, not failures


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not on PATH")
def test_real_wrk_against_a_small_server() -> None:
    srv = _Server(("127.0.0.1", 0), _Target)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    reqs = [
        wrk.Request("/a", b"A" * 100, "image/png"),
        wrk.Request("/b", b"\x00\xffB", "application/octet-stream"),
        wrk.Request("/missing", b"{}", "application/json"),
    ]
    try:
        got = wrk.run(srv.server_port, reqs, 4, n_requests=300, timeout_s=5, limit_s=30)
        t0 = time.perf_counter()
        timed = wrk.run(srv.server_port, reqs, 2, seconds=0.4, timeout_s=5)
        elapsed = time.perf_counter() - t0
    finally:
        srv.shutdown()
    assert 300 <= got["requests"] <= 300 + 4 and got["transport_errors"] == 0
    assert set(got["codes"]) == {"200", "404"} and sum(got["codes"].values()) == got["requests"]
    assert got["non_2xx"] == got["codes"]["404"] and abs(got["codes"]["404"] - got["requests"] / 3) <= 4
    assert got["p50_ms"] > 0 and got["p99_ms"] >= got["p50_ms"]
    per_path = Counter(path for path, _, _ in _Target.seen)
    assert max(per_path.values()) - min(per_path.values()) <= 4  # rotation: each request in turn
    wanted = {r.path: (r.content_type, r.body) for r in reqs}
    assert all(wanted[path] == (ctype, body) for path, ctype, body in _Target.seen)
    assert timed["requests"] > 0 and 0.4 <= timed["wall_s"] < 1.5 and elapsed < 3
