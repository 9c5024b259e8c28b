"""Resident memory of a running server across a live reload (issue 14): what adding a task costs beside
a reload that changes nothing, in steady state, per process.

    python -m service.bench.reload_memory --bundle bundles/demo --added NEW_BUNDLE \\
        --workers 0,1 --variants both,none --out results/add-task/memory.json

NEW_BUNDLE is ``mtserve add-task``'s output for BUNDLE. For every layout (``--workers``), heap handling
(``--variants``: service/heap.py's trim and arena cap, on or off) and reload, a fresh server on a copy
of BUNDLE serves ``--rounds`` rounds of ``--requests`` ``/predict`` requests (``--clients`` closed-loop
clients, every task in turn; each round ends with a scrape of /metrics, /readyz, /tasks, /admin/model),
reloads (``same``: the same files as a new version, the fixed cost of any reload; ``added``: the
bundle with the new task; ``same+added``: both, growth over the last), and serves the same rounds on
the new version's tasks. The RSS of every process of the server is read ``--settle`` s after each
round. Growth = after the last round after the reload - after the last round before it; the drift
between the last two rounds before the reload says what serving alone moves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from contract.manifest import read_manifest
from service.bench.loadgen import _CLEN, HOST, http_post
from service.bench.machine import describe
from service.bench.payloads import image
from service.bench.server import mtserve

TOKEN = "reload-memory-bench-token-0123456789"
MIB = 2**20
# the server's heap handling (service/heap.py): trim after engines start and stop, at most 2 arenas
VARIANTS = {
    "both": {"MTSERVE_TRIM_HEAP": "1", "MTSERVE_MALLOC_ARENAS": "2"},
    "trim": {"MTSERVE_TRIM_HEAP": "1", "MTSERVE_MALLOC_ARENAS": "0"},
    "arenas": {"MTSERVE_TRIM_HEAP": "0", "MTSERVE_MALLOC_ARENAS": "2"},
    "none": {"MTSERVE_TRIM_HEAP": "0", "MTSERVE_MALLOC_ARENAS": "0"},  # as before service/heap.py
}
# the same without session reuse (every version loads all its files): what the trim gives back on close
VARIANTS |= {f"{k}-no-reuse": v | {"MTSERVE_SESSION_REUSE": "0"} for k, v in list(VARIANTS.items())}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, default=Path("bundles/demo"))
    p.add_argument("--added", type=Path, required=True, help="BUNDLE with a task added (mtserve add-task)")
    p.add_argument("--workers", default="0,1", help="layouts, comma list of --workers values")
    p.add_argument("--variants", default="both,none", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument(
        "--reloads",
        default="same,added,same+added",
        help="comma list of reloads: same, added, or a sequence (same+added: growth of the last only)",
    )
    p.add_argument("--requests", type=int, default=400, help="requests per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds before and after the reload")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads")
    p.add_argument("--repeat", type=int, default=1, help="runs of every setting (medians reported)")
    p.add_argument("--settle", type=float, default=1.5, help="seconds between a round and the RSS reading")
    p.add_argument("--work", type=Path, default=Path("/tmp/mtserve-reload-memory"))
    p.add_argument("--out", type=Path, default=Path("results/add-task/memory.json"))


def prepare(bundle: Path, added: Path, work: Path) -> Path:
    """WORK/models/{v1, same, added}: the bundle, the same files as a new version, the added bundle."""
    models = work / "models"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(bundle, models / "v1")
    shutil.copytree(bundle, models / "same")
    shutil.copytree(added, models / "added")
    manifest = json.loads((models / "same" / "manifest.json").read_text())
    manifest["version"] = f"{manifest['version']}-same"
    (models / "same" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return models


def new_files_bytes(v1: Path, v2: Path) -> int:
    """Bytes of the files of ``v2`` whose sha256 ``v1`` does not have."""
    old = {v.sha256 for s in read_manifest(v1).segments for v in s.variants.values()}
    return sum(
        (v2 / v.file).stat().st_size
        for s in read_manifest(v2).segments
        for v in s.variants.values()
        if v.sha256 not in old
    )


def processes(pid: int) -> dict[int, tuple[str, int]]:
    """pid -> (role, RSS bytes) for the server and its descendants; roles from the command line."""
    out: dict[int, tuple[str, int]] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{p}/status").read_text()
            kids = [int(c) for t in Path(f"/proc/{p}/task").glob("*/children") for c in t.read_text().split()]
        except OSError:
            continue
        role = "engine" if b"engine" in cmd[3:5] else "api" if b"api" in cmd[3:5] else "server"
        rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
        out[p] = (role, rss)
        todo += kids
    return out


def kinds(procs: dict[int, tuple[str, int]]) -> dict[str, float]:
    """MiB of every process together by kind (``/proc/PID/status``): anonymous (the heaps, thread
    stacks, Python's arenas: memory the process allocated), file-backed (code and data of the
    libraries and files it maps, pages first touched count too: shared with every process mapping
    them) and shared memory (the status block, the metrics files of ``--workers``)."""
    out = {"anon": 0.0, "file": 0.0, "shmem": 0.0}
    for p in procs:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            key = {"RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}.get(line.split(":")[0] + ":")
            if key:
                out[key] += int(line.split()[1]) / 1024
    return {k: round(v, 2) for k, v in out.items()}


def by_role(procs: dict[int, tuple[str, int]]) -> dict[str, float]:
    """MiB per role (API processes summed) and in all."""
    out: dict[str, float] = {}
    for role, rss in procs.values():
        out[role] = out.get(role, 0) + rss / MIB
    out["all"] = sum(out.values())
    return {k: round(v, 2) for k, v in sorted(out.items())}


async def serve_round(port: int, requests: dict[str, bytes], n: int, clients: int) -> dict[str, int]:
    """``n`` requests from ``clients`` keep-alive closed-loop clients, the tasks in turn; codes counted."""
    names, codes, sent = list(requests), {}, 0

    async def client() -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while sent < n:
                task, sent = names[sent % len(names)], sent + 1
                writer.write(requests[task])
                head = await reader.readuntil(b"\r\n\r\n")
                m = _CLEN.search(head)
                await reader.readexactly(int(m.group(1)) if m else 0)
                codes[head[9:12].decode()] = codes.get(head[9:12].decode(), 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return codes


def scrape(port: int) -> None:
    """What a deployment polls between requests (Prometheus, probes, an operator): GET /metrics, /readyz,
    /tasks, /admin/model. Each round ends with one, so the routes' lazy state is built before the
    reload, as it is in any server that has been scraped once."""
    for path in ("/metrics", "/readyz", "/tasks", "/admin/model"):
        req = urllib.request.Request(
            f"http://{HOST}:{port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()


def reload(port: int, name: str) -> dict:
    req = urllib.request.Request(
        f"http://{HOST}:{port}/admin/reload",
        data=json.dumps({"bundle": name}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def rounds(port: int, pid: int, bundle: Path, args: argparse.Namespace) -> list[dict]:
    """``--rounds`` rounds on every task of ``bundle``; the RSS by role after each."""
    manifest = read_manifest(bundle)
    requests = {
        t: http_post(f"/predict/{t}?top_k=1", image(manifest, k), "image/jpeg")
        for k, t in enumerate(manifest.tasks)
    }
    out = []
    for _ in range(args.rounds):
        codes = asyncio.run(serve_round(port, requests, args.requests, args.clients))
        scrape(port)
        time.sleep(args.settle)
        procs = processes(pid)
        out.append({"codes": codes, "rss_mib": by_role(procs), "rss_kinds_mib": kinds(procs)})
    return out


def one_run(models: Path, workers: int, variant: str, which: str, args: argparse.Namespace) -> dict:
    """A fresh server on v1: rounds, then for every bundle of ``which`` (``same+added``: reload onto
    ``same``, then onto ``added``) a reload and rounds; growth over the last reload only."""
    env = {"MTSERVE_ADMIN_TOKEN": TOKEN, **VARIANTS[variant]}
    extra = ["--workers", str(workers)]
    steps = which.split("+")
    with mtserve(models / "v1", args.threads, extra, env=env) as (port, proc):
        before = rounds(port, proc.pid, models / "v1", args)
        for name in steps[:-1]:
            reload(port, name)
            before = rounds(port, proc.pid, models / name, args)
        answer = reload(port, steps[-1])
        after = rounds(port, proc.pid, models / steps[-1], args)
    last0, last1 = before[-1]["rss_mib"], after[-1]["rss_mib"]
    prev = before[-2]["rss_mib"] if len(before) > 1 else last0
    return {
        "workers": workers,
        "heap": variant,
        "reload": which,
        "reload_answer": answer,
        "before": before,
        "after": after,
        "growth_mib": {k: round(v - last0.get(k, 0), 2) for k, v in last1.items()},
        "growth_kinds_mib": {
            k: round(v - before[-1]["rss_kinds_mib"].get(k, 0), 2)
            for k, v in after[-1]["rss_kinds_mib"].items()
        },
        "drift_mib": {k: round(v - prev.get(k, 0), 2) for k, v in last0.items()},
    }


def _spread(values: list[float], fmt: str = "+.2f") -> str:
    """Median, and the range over repetitions when there are several."""
    mid = float(np.median(values))
    if len(values) == 1:
        return format(mid, fmt)
    return f"{mid:{fmt}} ({min(values):{fmt}} .. {max(values):{fmt}})"


def _kinds(runs: list[dict]) -> str:
    """Medians of the growth by kind (runs measured before the kinds were recorded: -)."""
    if not all("growth_kinds_mib" in r for r in runs):
        return "-"
    return " / ".join(
        f"{float(np.median([r['growth_kinds_mib'][k] for r in runs])):+.2f}"
        for k in ("anon", "file", "shmem")
    )


def table(result: dict) -> str:
    """One row per (layout, heap handling, reload): medians over the repetitions, their range."""
    new = result["new_files_bytes"] / MIB
    groups: dict[tuple, list[dict]] = {}
    for r in result["runs"]:
        groups.setdefault((r["workers"], r["heap"], r["reload"]), []).append(r)
    lines = [
        "| --workers | heap | reload | runs | RSS before: all (engine) | growth: all | engine | API | "
        "drift before | all: anon / file / shmem | all / new files |",
        "| --- | --- | --- | ---: | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (workers, heap, which), runs in groups.items():
        role = "engine" if "engine" in runs[0]["growth_mib"] else "server"

        def col(key: str, role: str = "all", runs: list[dict] = runs) -> list[float]:
            return [r[key].get(role, 0.0) for r in runs]

        before = [r["before"][-1]["rss_mib"] for r in runs]
        lines.append(
            f"| {workers} | {heap} | {which} | {len(runs)} | {np.median([b['all'] for b in before]):.1f} "
            f"({np.median([b[role] for b in before]):.1f}) | {_spread(col('growth_mib'))} | "
            f"{_spread(col('growth_mib', role))} | {_spread(col('growth_mib', 'api'))} | "
            f"{_spread(col('drift_mib'))} | {_kinds(runs)} | "
            f"{_spread([g / new for g in col('growth_mib')], '.1f')}x |"
        )
    return "\n".join(lines) + (
        f"\n\nnew files: {new:.2f} MiB. RSS in MiB after the last round before / after the reload; medians "
        "over the runs (range); engine: the engine process (--workers 0: the one process); API: the API "
        "processes; all: every process of the server; anon / file / shmem: the growth of all by kind of "
        "page (RssAnon, RssFile, RssShmem), medians"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    models = prepare(args.bundle, args.added, args.work)
    result = {
        "command": "python -m service.bench.reload_memory " + " ".join(argv or sys.argv[1:]),
        "machine": describe(),
        "new_files_bytes": new_files_bytes(models / "v1", models / "added"),
        "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for rep in range(args.repeat):  # repetitions outermost: a noisy spell hits every setting alike
        for workers in (int(w) for w in args.workers.split(",")):
            for variant in args.variants.split(","):
                for which in args.reloads.split(","):
                    run = one_run(models, workers, variant, which, args) | {"repetition": rep}
                    result["runs"].append(run)
                    print(
                        f"{rep}: --workers {workers} {variant} {which}: growth {run['growth_mib']}",
                        flush=True,
                    )
                    args.out.write_text(json.dumps(result, indent=2) + "\n")  # what is done so far
    result["machine"]["loadavg_at_end"] = describe()["loadavg"]
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(result) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
