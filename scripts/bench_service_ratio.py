"""Service throughput over raw onnxruntime throughput, and latency at several concurrencies.

1. raw: the bundle's sessions chained by hand (stems on their rows, one trunk call, heads), batch
   of ``--batch-size`` rows mixing every task, same thread settings as the server: rows/s.
2. service: ``mtserve serve`` in a subprocess with ``--max-batch-size`` = that batch size; clients
   keep ``--concurrency`` requests in flight on ``/v2/models/{task}/infer`` with an FP32 tensor
   (Triton binary tensor extension, or JSON with ``--encoding json``), tasks round-robin: rows/s.
   ratio = service / raw (target >= 0.9).
3. ``POST /predict/{task}`` with a PNG image, tasks mixed, at concurrency 1, 8, 32: requests/s,
   p50, p99; and from /metrics, the share of shared-trunk batches that mixed tasks.

    .venv/bin/python scripts/bench_service_ratio.py bundles/demo --threads 2 --batch-size 32
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.bench.server import free_port  # noqa: E402
from service.bundle import load_bundle  # noqa: E402


# -- 1. raw onnxruntime ---------------------------------------------------------------------------
def raw_runner(bundle_dir: str, batch: int, threads: int):
    """A function ``measure(seconds) -> (rows/s, CPU s/row)`` over sessions created once."""
    import onnxruntime as ort

    b = load_bundle(bundle_dir)
    m = b.manifest
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = {
        (s.name, v): ort.InferenceSession(str(b.path(s.name, v)), so, providers=["CPUExecutionProvider"])
        for s in m.segments
        for v in s.variants
    }
    tasks = sorted((list(m.tasks) * batch)[:batch])  # rows of one task contiguous
    x = np.random.default_rng(0).normal(size=(batch, *m.input.size)).astype(np.float32)

    def once() -> None:
        cur = x
        for i, seg in enumerate(m.segments):
            spans: dict[str, list[int]] = {}
            for r, t in enumerate(tasks):
                spans.setdefault(m.variant_of(t, seg.name), []).append(r)
            outs = []
            for vid, rows in spans.items():
                s = sess[(seg.name, vid)]
                outs.append(s.run(None, {s.get_inputs()[0].name: cur[rows[0] : rows[-1] + 1]})[0])
            if i < len(m.segments) - 1:
                cur = outs[0] if len(outs) == 1 else np.concatenate(outs)

    def measure(seconds: float) -> tuple[float, float]:
        """(rows/s, CPU seconds per row, all threads of this process)."""
        for _ in range(3):
            once()
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            once()
            n += batch
        return n / (time.perf_counter() - t0), (time.process_time() - c0) / n

    return measure


# -- a small keep-alive HTTP/1.1 load generator (cheap per request, unlike a full client) -----------
def http_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


async def load(port: int, requests: list[bytes], concurrency: int, seconds: float, warmup: float = 1.0):
    """Keep ``concurrency`` requests in flight for ``warmup + seconds``; return (count, latencies,
    codes, count including the warm-up)."""
    start = time.perf_counter()
    t_begin, t_end = start + warmup, start + warmup + seconds
    lat: list[float] = []
    codes: Counter = Counter()
    total = [0]
    clen = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")

    async def worker(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while (now := time.perf_counter()) < t_end:
            writer.write(requests[i % len(requests)])
            i += concurrency
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(clen.search(head).group(1)))
            done = time.perf_counter()
            total[0] += 1
            if now >= t_begin:
                lat.append(done - now)
                codes[int(head[9:12])] += 1
        writer.close()

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return len(lat), np.asarray(lat), codes, total[0]


# -- the server --------------------------------------------------------------------------------------
def start_server(args, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        args.bundle,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    cmd += ["--threads", str(args.threads), "--max-batch-size", str(args.batch_size)]
    cmd += ["--max-wait-ms", str(args.max_wait_ms), "--queue-size", "100000", "--log-level", "warning"]
    cmd += ["--batching", args.batching]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    import urllib.request

    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server never became ready")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    m = re.search("^" + re.escape(name) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def batch_stats(before: str, after: str, seconds: float) -> dict:
    def d(name: str) -> float:
        return metric(after, name) - metric(before, name)

    busy = sum(
        float(v) - metric(before, k)
        for k, v in re.findall(r"^(mtserve_segment_duration_seconds_sum\{[^}]*\}) (\S+)$", after, re.M)
    )

    batches = d("mtserve_batch_tasks_count")
    mixed = batches - d('mtserve_batch_tasks_bucket{le="1.0"}')
    trunk = 'segment="trunk"'
    rows = d(f"mtserve_batch_size_sum{{{trunk}}}")
    calls = d(f"mtserve_batch_size_count{{{trunk}}}")
    return {
        "shared_batches": int(batches),
        "mixed_share": round(mixed / batches, 3) if batches else 0.0,
        "mean_tasks_per_batch": round(d("mtserve_batch_tasks_sum") / batches, 2) if batches else 0.0,
        "mean_trunk_batch": round(rows / calls, 1) if calls else 0.0,
        "engine_busy_share": round(busy / seconds, 3),  # wall time inside onnxruntime (incl. warm-up)
    }


def tensor_requests(manifest, rows: int, encoding: str) -> list[bytes]:
    out = []
    for k, task in enumerate(manifest.tasks):
        x = np.random.default_rng(k).normal(size=(rows, *manifest.input.size)).astype("<f4")
        outputs = [{"name": "probabilities", "parameters": {"classification": 1}}]
        inp = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
        path = f"/v2/models/{task}/infer"
        if encoding == "binary":
            header = json.dumps(
                {"inputs": [inp | {"parameters": {"binary_data_size": x.nbytes}}], "outputs": outputs}
            )
            hdr = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": len(header)}
            out.append(http_request(path, header.encode() + x.tobytes(), hdr))
        else:
            body = json.dumps({"inputs": [inp | {"data": x.ravel().tolist()}], "outputs": outputs}).encode()
            out.append(http_request(path, body, {"Content-Type": "application/json"}))
    return out


def image_requests(manifest) -> list[bytes]:
    from PIL import Image

    _, h, w = manifest.input.size
    out = []
    for k, task in enumerate(manifest.tasks):
        buf = io.BytesIO()
        rng = np.random.default_rng(k)
        Image.fromarray(rng.integers(0, 255, (h + 8, w + 8, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(http_request(f"/predict/{task}?top_k=1", buf.getvalue(), {"Content-Type": "image/png"}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=0, help="default: 2 x batch size / rows per request")
    p.add_argument("--rows-per-request", type=int, default=1)
    p.add_argument("--encoding", choices=["binary", "json"], default="binary")
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--batching", choices=["cross-task", "per-task"], default="cross-task")
    p.add_argument("--latency", default="1,8,32", help="concurrencies for the /predict run ('' to skip)")
    p.add_argument("--skip-raw", action="store_true")
    p.add_argument("--repeat", type=int, default=3, help="raw and service runs, alternating")
    p.add_argument("--json-out")
    args = p.parse_args()
    manifest = load_bundle(args.bundle, verify_sha256=False).manifest
    result: dict = {"bundle": f"{manifest.name} {manifest.version} ({manifest.backbone}, {manifest.plan})"}
    result |= {"batch_size": args.batch_size, "threads": args.threads, "cpus": len(os.sched_getaffinity(0))}

    port = free_port()
    proc = start_server(args, port)  # idle while the raw runs: they alternate, so noise hits both
    raw = None if args.skip_raw else raw_runner(args.bundle, args.batch_size, args.threads)
    try:
        conc = args.concurrency or max(1, 2 * args.batch_size // args.rows_per_request)
        reqs = tensor_requests(manifest, args.rows_per_request, args.encoding)
        runs = []
        for _ in range(args.repeat):
            raw_rate, raw_cpu = raw(args.seconds) if raw else (None, None)
            before, cpu0 = scrape(port), cpu_seconds(proc.pid)
            n, lat, codes, total = asyncio.run(load(port, reqs, conc, args.seconds))
            svc_cpu = (cpu_seconds(proc.pid) - cpu0) / (total * args.rows_per_request)
            svc = n * args.rows_per_request / args.seconds
            run = {
                "raw_rows_per_s": round(raw_rate, 1) if raw_rate else None,
                "service_rows_per_s": round(svc, 1),
                "ratio": round(svc / raw_rate, 3) if raw_rate else None,
                # CPU-normalised: rows per CPU-second, server process vs raw (immune to other load)
                "raw_cpu_ms_per_row": round(raw_cpu * 1e3, 3) if raw_cpu else None,
                "service_cpu_ms_per_row": round(svc_cpu * 1e3, 3),
                "cpu_ratio": round(raw_cpu / svc_cpu, 3) if raw_cpu else None,
                "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2),
                "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 2),
                "codes": dict(codes),
                **batch_stats(before, scrape(port), args.seconds + 1),
            }
            runs.append(run)
            print(json.dumps(run), flush=True)
        result["service"] = {
            "route": f"/v2/models/{{task}}/infer FP32 ({args.encoding})",
            "concurrency": conc,
            "rows_per_request": args.rows_per_request,
            "runs": runs,
        }
        if raw:
            result["ratio_median"] = float(np.median([r["ratio"] for r in runs]))
            result["cpu_ratio_median"] = float(np.median([r["cpu_ratio"] for r in runs]))
            print(
                f"ratio (median of {len(runs)}): {result['ratio_median']}, "
                f"CPU-normalised: {result['cpu_ratio_median']}",
                flush=True,
            )

        result["predict"] = []
        for c in [int(v) for v in args.latency.split(",") if v]:
            before = scrape(port)
            n, lat, codes, _ = asyncio.run(load(port, image_requests(manifest), c, args.seconds))
            row = {
                "concurrency": c,
                "requests_per_s": round(n / args.seconds, 1),
                "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2),
                "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 2),
                "codes": dict(codes),
                **batch_stats(before, scrape(port), args.seconds + 1),
            }
            result["predict"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
