"""Where a request's time goes: py-spy samples `mtserve serve` while the bench load generator saturates it.

Writes ``OUT/profile-<name>.txt``: the CPU cores used by the server and by the load generator,
the samples per thread, and the heaviest frames (self and inclusive). Needs ``py-spy`` and ``psutil``.

    .venv/bin/python scripts/bench_profile.py bundles/bench/demo --route tensor --out results/bench
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.bundle import load_bundle
from service.bench import loadgen, payloads, server


def summarize(raw: Path, top: int = 25) -> str:
    """py-spy's collapsed stacks -> per-thread samples, top self frames, top inclusive frames."""
    own, incl, threads, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames, count = stack.split(";"), int(n)
        total += count
        threads[frames[0].split(":")[-1].strip() or frames[0]] += count
        own[frames[-1]] += count
        for f in set(frames[1:]):
            incl[f] += count
    lines = [f"samples: {total}", "per thread: " + json.dumps(dict(threads.most_common()))]
    lines += ["", "self:"] + [f"{v / total:6.1%}  {k}" for k, v in own.most_common(top)]
    lines += ["", "inclusive:"] + [f"{v / total:6.1%}  {k}" for k, v in incl.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--route", choices=["tensor", "jpeg"], default="tensor")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--server-args", default="", help="extra `mtserve serve` flags, e.g. '--max-wait-ms 0'")
    p.add_argument("--out", default="results/bench")
    p.add_argument("--name", help="default: <bundle name>-<route>")
    args = p.parse_args()
    import psutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    m = load_bundle(args.bundle, verify_sha256=False).manifest
    tasks = list(m.tasks)
    reqs = payloads.tensor_requests(m, tasks) if args.route == "tensor" else payloads.jpeg_requests(m, tasks)
    name = args.name or f"{Path(args.bundle).name}-{args.route}"
    with (
        tempfile.TemporaryDirectory() as tmp,
        server.mtserve(args.bundle, args.threads, ["--max-batch-size", "32", *args.server_args.split()]) as (
            port,
            proc,
        ),
    ):
        raw = Path(tmp) / "raw.txt"
        cmd = [spy, "record", "-p", str(proc.pid), "-f", "raw", "-r", "200", "-o", str(raw)]
        rec = subprocess.Popen(
            [*cmd, "-d", str(int(args.seconds + 1)), "--threads"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        sp, me = psutil.Process(proc.pid), psutil.Process()
        c0, m0, t0 = sp.cpu_times(), me.cpu_times(), time.perf_counter()
        mix = loadgen.task_mix(tasks, "uniform")
        res = loadgen.run(loadgen.closed_loop(port, reqs, [mix] * args.clients, args.seconds, 0.5))
        c1, m1, t1 = sp.cpu_times(), me.cpu_times(), time.perf_counter()
        rec.wait(timeout=60)
        head = {
            "bundle": args.bundle,
            "route": args.route,
            "clients": args.clients,
            "loadavg": os.getloadavg(),
            "server_cores": round((c1.user + c1.system - c0.user - c0.system) / (t1 - t0), 2),
            "loadgen_cores": round((m1.user + m1.system - m0.user - m0.system) / (t1 - t0), 2),
            **res.summary(),
        }
        text = json.dumps(head) + "\n" + summarize(raw)
    out = Path(args.out) / f"profile-{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text[:2000])


if __name__ == "__main__":
    main()
