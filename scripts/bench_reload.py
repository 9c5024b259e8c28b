"""Live reload figures: a real ``mtserve serve BUNDLE`` on 127.0.0.1, a steady stream of concurrent
``/predict`` requests, and N reloads of the configured bundle (``POST /admin/reload``, no body).

    .venv/bin/python scripts/bench_reload.py bundles/demo --reloads 3 --clients 8

Prints each reload's wall time and its verify / warm-up / drain split, the requests that overlapped
a reload, and the failures (any answer but 200; the expected figure is 0).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.bench.server import free_port  # noqa: E402

TOKEN = "bench-reload-token-0123456789abcdef"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--reloads", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", str(args.bundle), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ | {"MTSERVE_ADMIN_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                return 1
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        info = httpx.get(url + "/tasks").json()
        names = [t["name"] for t in info["tasks"]]
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            buf, "PNG"
        )
        image = buf.getvalue()
        answers: list[tuple[float, float, int]] = []
        reloads: list[tuple[float, float, int, dict]] = []

        async def run() -> None:
            stop = asyncio.Event()
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:

                async def stream(i: int) -> None:
                    k = 0
                    while not stop.is_set():
                        t0 = time.monotonic()
                        task = names[(i + k) % len(names)]
                        r = await client.post(
                            f"/predict/{task}", content=image, headers={"content-type": "image/png"}
                        )
                        answers.append((t0, time.monotonic(), r.status_code))
                        k += 1

                workers = [asyncio.create_task(stream(i)) for i in range(args.clients)]
                await asyncio.sleep(1.0)
                for _ in range(args.reloads):
                    t0 = time.monotonic()
                    r = await client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
                    reloads.append((t0, time.monotonic(), r.status_code, r.json()))
                    await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*workers)

        asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    during = sum(1 for a, b, *_ in reloads for t0, t1, _ in answers if t0 < b and t1 > a)
    failed = sum(code != 200 for *_, code in answers)
    print(f"{args.bundle}: {info['bundle']} {info['version']}, {len(names)} tasks, {args.clients} clients")
    for a, b, code, body in reloads:
        split = ", ".join(f"{k} {body.get(k)}" for k in ("verify_s", "warmup_s", "drain_s"))
        print(f"  reload {code}: {b - a:.3f} s wall ({split})")
    print(f"  requests: {len(answers)}, {during} overlapping a reload, {failed} failed")
    return 1 if failed or any(code != 200 for _, _, code, _ in reloads) else 0


if __name__ == "__main__":
    sys.exit(main())
