"""``mtserve bench workers``: throughput against ``--workers`` (API processes before one engine process)
with an engine that emulates a device (``--emulate-device-ms``: each batch sleeps, no CPU), so that
what scales is the front (HTTP, decode, preprocess, answer, the wire) even on a 2-core machine.

One server per workers value, all started first; then rounds that interleave them: per server and per
connection count of ``--workers-concurrency`` (a list), ``--requests`` single-image ``/predict`` POSTs
(the demo PNG, top-5; ``--loadgen``: wrk, else hey, else the project's load generator), requests/s and
the CPU per request outside the engine process (service/bench/proc_cpu.py). A server's throughput is
its best median over the connection counts (its saturation: as P1's ``--saturation``; one layout
peaks at fewer connections than another: measured here, one API process at 64 to 512 connections
within noise, two from 4,600-5,100 requests/s at 64 to 6,900-8,350 at 512). The figure: that
throughput per workers value and its ratio to the first value's (1 worker by default); every point is
in the table.

The load generator shares the machine's CPUs, and so does the engine process: each row also says
what the load generator spent per request (its CPU time, a reaped child's), how many CPUs were busy,
and the ratio the machine allows at best at that CPU per request (``x_ceiling``): on 2 cores, 2 API
processes, the engine process and wrk share them, so the ratio cannot pass 2 x API / (API + engine +
wrk) however the front scales.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from service.bench import api_cpu, machine, report, server, wrk
from service.bench.machine import describe
from service.precision import int8_flags

CEILING_NOTE = (
    "- loadgen_ms: the load generator's CPU per request, on the same CPUs; cpus_busy: what the server, its "
    "engine process and the load generator kept busy; x_ceiling: requests/s with every usable CPU busy at "
    "this row's CPU per request, over the first server's peak (the most x_first can be on this machine)\n"
)
PER_CONNECTION = 16  # requests per connection in a round, at least (--requests is raised to it)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workers scenario")
    g.add_argument("--workers-list", default="1,2,4", help="workers: the --workers values (default 1,2,4)")
    g.add_argument("--emulate-device-ms", type=float, default=2.0, help="workers: ms per emulated batch")
    g.add_argument(
        "--workers-concurrency",
        type=connection_counts,
        default="128,256,512",
        help="workers: connections, a list (each --workers value's figure is its best: its saturation)",
    )


def connection_counts(text: str) -> list[int]:
    """``128,256,512`` -> [128, 256, 512] (argparse: a one-line error otherwise)."""
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of connection counts >= 1")
    return counts


def supported() -> str | None:
    """Why the scenario cannot run on this tree (no ``--workers`` or ``--emulate-device-ms``), or None."""
    for flag in ("--workers", "--emulate-device-ms"):
        if not api_cpu._supports(server.ROOT, flag):
            return f"`mtserve serve` has no {flag} flag in this tree"
    return None


def _target(bundle: Path, workers: int, args) -> api_cpu.Target:
    extra = ["--workers", str(workers), "--emulate-device-ms", str(args.emulate_device_ms)]
    extra += ["--max-batch-size", str(args.max_batch_size), *args.server_args.split()]
    t = api_cpu.ours(f"workers={workers}", server.ROOT, bundle, extra)
    return t


def _rows(targets: list[api_cpu.Target], cpus: int | None = None) -> list[dict]:
    """Per server and connection count the medians over rounds; per server its best row (the most
    requests/s: its throughput at saturation) is ``peak``; ``x_first``: requests/s over the first
    server's peak. With ``cpus`` (the usable CPUs): ``cpus_busy``, the CPUs the server, its engine
    process and the load generator kept busy (requests/s x their CPU per request), and ``x_ceiling``,
    the requests/s that CPU per request allows with all ``cpus`` busy over the first server's peak:
    the most the machine lets this layout reach, whatever the front does."""
    rows = []
    for t in targets:
        levels = sorted({r["concurrency"] for r in t.rounds})
        mine = []
        for c in levels:
            at = [r for r in t.rounds if r["concurrency"] == c]
            row = {"server": t.name, "connections": c, "rounds": len(at)}
            for key in ("rps", "front_ms", "engine_ms", "loadgen_ms"):
                row[key] = round(statistics.median(r.get(key, 0.0) for r in at), 4)
            row["codes"] = at[-1]["codes"]
            row["tool"] = at[-1]["tool"]
            mine.append(row)
        best = max(mine, key=lambda row: row["rps"])
        for row in mine:
            row["peak"] = row is best
        rows += mine
    base = next(row["rps"] for row in rows if row["peak"]) or float("nan")
    for row in rows:
        row["x_first"] = round(row["rps"] / base, 3)
        spent_ms = row["front_ms"] + row["engine_ms"] + row["loadgen_ms"]
        if cpus and spent_ms > 0:
            row["cpus_busy"] = round(row["rps"] * spent_ms / 1e3, 2)
            row["x_ceiling"] = round(cpus * 1e3 / spent_ms / base, 3)
    return rows


def _capacity_line(contention: dict) -> str:
    """The machine's state beside the ratios (machine.contention): on a shared host two busy vCPUs
    may do much less than twice the work of one, and then so may two API processes."""
    start, end = contention["start"], contention["end"]
    return (
        f"- two busy CPUs did the work of {start['pair_capacity']} / {end['pair_capacity']} CPUs alone "
        f"(a fixed loop, start / end of the run; 2 on two free cores)\n"
    )


def run_workers(args) -> dict:
    """The scenario; writes ``--out/workers.{json,md,png}``. Refuses (SystemExit) on a tree without the
    flags it needs."""
    if (why := supported()) is not None:
        raise SystemExit(f"bench workers: {why}")
    from contract.bundle import load_bundle

    args.loadgen = wrk.pick(args.loadgen, one_body=True)  # fail before starting servers
    bundle = Path(args.demo)
    manifest = load_bundle(bundle, verify_sha256=False).manifest
    task = args.task or ("digits" if "digits" in manifest.tasks else next(iter(manifest.tasks)))
    req = wrk.Request(f"/predict/{task}?top_k=5", api_cpu.demo_image(bundle, args.image), "image/png")
    values = [int(v) for v in args.workers_list.split(",")]
    levels = list(args.workers_concurrency)
    # a round of a few requests per connection is mostly wrk's start and end (every connection
    # opening, the last ones finishing alone): at least PER_CONNECTION each, the caller's args untouched
    if args.requests < (least := PER_CONNECTION * max(levels)):
        print(f"bench workers: {least} requests a round ({PER_CONNECTION} a connection)", flush=True)
        args = argparse.Namespace(**{**vars(args), "requests": least})
    targets = [_target(bundle, w, args) for w in values]
    result = {
        "scenario": "workers",
        "title": f"/predict requests/s vs --workers, device emulated ({args.emulate_device_ms:g} ms/batch)",
        "bundle": str(bundle),
        "machine": describe("cpu"),
        "cpu_flags": int8_flags(),
        "config": {"workers": values, "emulate_device_ms": args.emulate_device_ms, "requests": args.requests,
                   "concurrency": levels, "rounds": args.rounds, "task": task,
                   "max_batch_size": args.max_batch_size, "server_args": args.server_args,
                   "loadgen": args.loadgen},
    }  # fmt: skip
    contention = {"start": machine.contention()}  # what two busy CPUs are worth now (see there)
    api_cpu.interleaved(targets, args, levels, req, "rps", "{:.0f} requests/s")
    contention["end"] = machine.contention()
    rows = _rows(targets, result["machine"].get("usable_cpus"))
    result |= {"rows": rows, "rounds": [r for t in targets for r in t.rounds], "contention": contention}
    result["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    peaks = [row for row in rows if row["peak"]]
    result["figure"] = {
        row["server"]: {k: row[k] for k in ("rps", "x_first", "x_ceiling", "connections") if k in row}
        for row in peaks
    }
    names, rps = [r["server"] for r in peaks], [r["rps"] for r in peaks]
    md = report.table(rows, list(rows[0])) + "\n" + _capacity_line(contention) + CEILING_NOTE
    report.write(Path(args.out), "workers", result, md, lambda ax: report.bars(ax, names, rps, "requests/s"))
    return result
