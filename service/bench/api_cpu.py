"""``mtserve bench api-cpu``: CPU time per single-image ``/predict`` request spent on everything but the
engine (HTTP, validation, decode, preprocess, answer), side by side with a minimal raw-ASGI app under
uvicorn doing the same decode, preprocessing and JSON answer without an engine
(service/bench/raw_asgi_app.py).

Per server and round: a warm-up, then ``--requests`` POSTs of the demo PNG (top-5 JSON) from
``--loadgen`` (auto: wrk, else ``hey -n N -c C``, else the project's generator; service/bench/wrk.py),
and the servers' CPU seconds from /proc before and after (service/bench/proc_cpu.py): all processes of
the server except the engine process, and in a single-process server all threads except the engine's.
Rounds interleave the servers, so that what else the machine runs weighs on each alike; the figure is
the median over rounds, and the ratio ours/raw is taken per round. ``--baseline DIR`` adds the server of
another source tree (a ``git worktree`` of an older commit: a before/after A/B in the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from service.bench import machine, payloads, proc_cpu, report, server, wrk
from service.bench.machine import describe
from service.precision import int8_flags

ROOT = server.ROOT
DEMO_PNG = "data/demo/digits/val/3"


@dataclass
class Target:
    """A server under test: how to start it (``{port}`` filled in) and its CPU per round."""

    name: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ready: str = "/readyz"
    rounds: list[dict] = field(default_factory=list)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("api-cpu and workers scenarios")
    g.add_argument("--requests", type=int, default=3000, help="api-cpu: requests per server and round")
    g.add_argument("--concurrency", type=int, default=8, help="api-cpu: connections (hey -c)")
    g.add_argument("--image", help="api-cpu: the PNG to send (default: a demo digit, else synthetic)")
    g.add_argument(
        "--route",
        choices=["predict", "v2"],
        default="predict",
        help="api-cpu: an image to /predict (default), or a preprocessed FP32 row to /v2/models/{task}/infer",
    )
    g.add_argument("--task", help="api-cpu: the task (default: digits if the bundle has it, else the first)")
    g.add_argument("--baseline", action="append", default=[], help="api-cpu: another source tree to A/B")
    g.add_argument("--server-args", default="", help="api-cpu, workers: extra `mtserve serve` flags")
    g.add_argument("--name", default="api-cpu", help="api-cpu: the result's file name (no extension)")
    g.add_argument("--ours-workers", default="0,1", help="api-cpu: the server's --workers values (0,1)")
    g.add_argument(
        "--ours-emulated",
        type=float,
        default=0.0,
        help="api-cpu: also serve this tree with --emulate-device-ms MS (ours-...-emulated): the front "
        "alone, without the engine's threads beside it on the CPUs (0: not)",
    )


def demo_image(bundle: Path, given: str | None) -> bytes:
    if given:
        return Path(given).read_bytes()
    found = sorted((ROOT / DEMO_PNG).glob("*.png"))
    if found:
        return found[0].read_bytes()
    import io

    from PIL import Image

    from contract.bundle import load_bundle
    from service.bench.payloads import image

    buf = io.BytesIO()
    Image.open(io.BytesIO(image(load_bundle(bundle, verify_sha256=False).manifest, 0))).save(buf, "PNG")
    return buf.getvalue()


def _supports(tree: Path, flag: str) -> bool:
    src = tree / "service" / "serve_cli.py"
    return src.exists() and f'"{flag}"' in src.read_text()


def ours(name: str, tree: Path, bundle: Path, extra: list[str], workers: int | None = 0) -> Target:
    """``mtserve serve`` of the source ``tree`` (``python -P``: the tree's modules, not the cwd's) with
    ``--workers`` (0: one process) where the tree has the flag and ``extra`` does not set it."""
    cmd = [sys.executable, "-P", "-m", "service.cli", "serve", str(bundle.resolve()), "--host", "127.0.0.1"]
    cmd += ["--port", "{port}", "--queue-size", "100000", "--log-level", "warning"]
    if workers is not None and _supports(tree, "--workers") and "--workers" not in extra:
        cmd += ["--workers", str(workers)]
    return Target(name, cmd + extra, {"PYTHONPATH": str(tree.resolve())})


def raw(bundle: Path, inline: bool) -> Target:
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "service.bench.raw_asgi_app",
        str(bundle.resolve()),
        "--port",
        "{port}",
    ]
    return Target("raw-inline" if inline else "raw", cmd + (["--inline"] if inline else []), ready="/")


def request_of(args, manifest, task: str, bundle: Path) -> wrk.Request:
    """The one request every round sends (``--route``): the demo image to ``/predict`` (top-5), or one
    preprocessed FP32 row to ``/v2/models/{task}/infer`` (binary tensor extension, top-1)."""
    if args.route == "v2":
        return wrk.from_raw(payloads.tensor_requests(manifest, [task])[task])
    return wrk.Request(f"/predict/{task}?top_k=5", demo_image(bundle, args.image), "image/png")


def load(port: int, req: wrk.Request, n: int, c: int, body_file: Path, tool: str = "auto") -> dict:
    """``n`` POSTs of ``req`` over ``c`` connections: status codes, transport errors, wall time and the
    load generator used (``--loadgen``: wrk when on PATH, else hey, else the project's generator);
    ``body_file`` holds the body (for hey)."""
    tool = wrk.pick(tool, one_body=True)
    t0 = time.perf_counter()
    if tool == "wrk":
        got = wrk.run(port, [req], c, n_requests=n)
        errors = got["transport_errors"]
        return {"tool": "wrk", "codes": got["codes"], "errors": errors, "wall_s": got["wall_s"]}
    if tool == "hey":
        url = f"http://127.0.0.1:{port}{req.path}"
        cmd = ["hey", "-n", str(n), "-c", str(c), "-m", "POST", "-T", req.content_type, "-D", str(body_file)]
        cmd += [a for k, v in req.headers for a in ("-H", f"{k}: {v}")] + [url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
        codes = {k: int(v) for k, v in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
        tail = out.partition("Error distribution:")[2]
        errors = sum(int(v) for v in re.findall(r"^\s+\[(\d+)\]\s", tail, re.M))
        return {"tool": "hey", "codes": codes, "errors": errors, "wall_s": time.perf_counter() - t0}
    from service.bench.loadgen import http_post, run

    codes = run(_own_load(port, http_post(req.path, req.body, req.content_type, dict(req.headers)), n, c))
    return {"tool": "python", "codes": codes, "errors": 0, "wall_s": time.perf_counter() - t0}


async def _own_load(port: int, request: bytes, n: int, c: int) -> dict[str, int]:
    from service.bench.loadgen import HOST, _exchange

    codes: dict[str, int] = {}

    async def client(k: int) -> None:
        conn = await asyncio.open_connection(HOST, port)
        try:
            for _ in range(k):
                code = str(await _exchange(conn, request))
                codes[code] = codes.get(code, 0) + 1
        finally:
            conn[1].close()

    await asyncio.gather(*(client(n // c + (i < n % c)) for i in range(c)))
    return codes


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measure(t: Target, port: int, pid: int, args, req: wrk.Request, body_file: Path) -> dict:
    """One round of one server: CPU per request by role (ms), the load generator's included
    (``loadgen_ms``: wrk's or hey's, a child reaped by the round; the project's own runs in this
    process), requests/s, status codes."""
    names = proc_cpu.names_of(pid)
    before = proc_cpu.Snapshot.take(pid)
    mine = _cpu_seconds(resource.RUSAGE_CHILDREN), _cpu_seconds(resource.RUSAGE_SELF)
    got = load(port, req, args.requests, args.concurrency, body_file, args.loadgen)
    spent = _cpu_seconds(resource.RUSAGE_CHILDREN) - mine[0], _cpu_seconds(resource.RUSAGE_SELF) - mine[1]
    after = proc_cpu.Snapshot.take(pid)
    for p, n in proc_cpu.names_of(pid).items():  # threads started during the run
        names.setdefault(p, {}).update(n)
    cpu = proc_cpu.by_role(before, after, names)
    n = sum(got["codes"].values()) or args.requests  # hey sends n // c per connection, wrk a few more
    row = {"server": t.name, "requests": n, "rps": round(n / got["wall_s"], 1)}
    row |= {f"{k}_ms": round(v / n * 1e3, 4) for k, v in cpu.items()}
    row["loadgen_ms"] = round((spent[1] if got["tool"] == "python" else spent[0]) / n * 1e3, 4)
    row |= {"codes": {str(k): v for k, v in got["codes"].items()}, "errors": got["errors"]}
    row["tool"] = got["tool"]
    row["loadavg"] = round(os.getloadavg()[0], 2)
    return row


def summarize(targets: list[Target]) -> tuple[list[dict], dict]:
    """Per server the median over rounds; per ``ours*`` server its ratio to ``raw`` (median of the
    per-round ratios) and to ``raw-inline``."""
    rows, ratios = [], {}
    for t in targets:
        row = {"server": t.name, "rounds": len(t.rounds)}
        for key in ("front_ms", "loop_ms", "decode_ms", "other_ms", "unnamed_ms", "engine_ms", "rps"):
            row[key] = round(statistics.median(r[key] for r in t.rounds), 4)
        row["tool"] = t.rounds[-1]["tool"]
        rows.append(row)
    by = {t.name: t for t in targets}
    for t in targets:
        if not t.name.startswith("ours"):
            continue
        for ref in ("raw", "raw-inline"):
            if ref in by:
                per = [a["front_ms"] / b["front_ms"] for a, b in zip(t.rounds, by[ref].rounds, strict=True)]
                ratios[f"{t.name}/{ref}"] = round(statistics.median(per), 3)
    return rows, ratios


def targets_of(args, bundle: Path) -> list[Target]:
    extra = args.server_args.split()
    out: list[Target] = []
    for tree in [ROOT, *map(Path, args.baseline)]:
        name = "ours" if tree == ROOT else f"ours@{tree.name}"
        if "--workers" in extra or not _supports(tree, "--workers"):
            out.append(ours(name, tree, bundle, extra, None))
        else:  # one process, and API processes before an engine process
            out += [ours(f"{name}-w{w}", tree, bundle, extra, int(w)) for w in args.ours_workers.split(",")]
    if args.ours_emulated > 0:  # this tree's front again, before an engine that sleeps instead of computing
        flag = ["--emulate-device-ms", f"{args.ours_emulated:g}"]
        mine = [t for t in out if not t.name.startswith("ours@")]
        out += [replace(t, name=f"{t.name}-emulated", cmd=[*t.cmd, *flag], rounds=[]) for t in mine]
    return [*out, raw(bundle, inline=False), raw(bundle, inline=True)]


def interleaved(
    targets: list[Target], args, concurrency: int | Sequence[int], req: wrk.Request, key: str, fmt: str
):
    """Start every target, warm each up, then measure them in rounds whose order rotates (so the
    machine's background load falls on all of them alike); each round is appended to ``t.rounds``.
    Several ``concurrency`` values: each round measures every target at each of them (in an order
    that rotates too), the value in the round's ``concurrency``."""
    levels = [concurrency] if isinstance(concurrency, int) else list(concurrency)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(req.body)
        started = []
        for t in targets:
            port = server.free_port()
            cmd = [a.replace("{port}", str(port)) for a in t.cmd]
            proc = stack.enter_context(server.running(cmd, port, t.ready, 300.0, t.env))
            load(port, req, max(200, args.requests // 10), levels[0], body_file, args.loadgen)  # warm-up
            started.append((t, port, proc.pid))
        for r in range(args.rounds):
            for t, port, pid in started[r % len(started) :] + started[: r % len(started)]:
                for c in levels[r % len(levels) :] + levels[: r % len(levels)]:
                    load_args = argparse.Namespace(**{**vars(args), "concurrency": c})
                    t.rounds.append(measure(t, port, pid, load_args, req, body_file) | {"concurrency": c})
                    at = f" at {c} connections" if len(levels) > 1 else ""
                    print(f"round {r + 1} {t.name}{at}: {fmt.format(t.rounds[-1][key])}", flush=True)


def run_api_cpu(args) -> dict:
    """The scenario (see the module's docstring); writes ``--out/--name.{json,md,png}``."""

    from contract.bundle import load_bundle

    args.loadgen = wrk.pick(args.loadgen, one_body=True)  # fail before starting servers
    bundle = Path(args.demo)
    manifest = load_bundle(bundle, verify_sha256=False).manifest
    task = args.task or ("digits" if "digits" in manifest.tasks else next(iter(manifest.tasks)))
    req = request_of(args, manifest, task, bundle)
    targets = targets_of(args, bundle)
    route = "/v2 FP32 tensor" if args.route == "v2" else "/predict"
    result = {
        "scenario": "api-cpu",
        "title": f"CPU per single-image {route} request outside the engine: mtserve vs a raw ASGI app",
        "bundle": str(bundle),
        "machine": describe("cpu"),
        "cpu_flags": int8_flags(),
        "config": {"requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds,
                   "task": task, "route": args.route, "body_bytes": len(req.body),
                   "server_args": args.server_args, "baselines": args.baseline, "loadgen": args.loadgen},
    }  # fmt: skip
    contention = {"start": machine.contention()}  # how much the 2 CPUs slow each other (see there)
    interleaved(targets, args, args.concurrency, req, "front_ms", "{:.3f} ms CPU/request")
    contention["end"] = machine.contention()
    result["contention"] = contention
    rows, ratios = summarize(targets)
    result |= {"rows": rows, "ratios": ratios, "rounds": [r for t in targets for r in t.rounds]}
    result["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["figure"] = {"front_ms": {r["server"]: r["front_ms"] for r in rows}, "ratios": ratios}
    md = report.table(rows, list(rows[0])) + "\n" + "".join(f"- {k}: **{v}**\n" for k, v in ratios.items())
    md += f"- a fixed loop in a pair vs alone (start / end): {contention['start']['slowdown']}x / "
    md += f"{contention['end']['slowdown']}x\n"
    names, values = [r["server"] for r in rows], [r["front_ms"] for r in rows]
    report.write(
        Path(args.out), args.name, result, md, lambda ax: report.bars(ax, names, values, "ms CPU / request")
    )
    return result
