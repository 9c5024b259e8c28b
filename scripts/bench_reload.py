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
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.bench import server

TOKEN = "bench-reload-token-0123456789abcdef"


async def load_and_reload(url: str, names: list[str], image: bytes, clients: int, reloads: int):
    """``clients`` streams of ``/predict`` while ``reloads`` reloads run one after another; returns the
    answers (start, end, status) and the reloads (start, end, status, body)."""
    answers: list[tuple[float, float, int]] = []
    done: list[tuple[float, float, int, dict]] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def stream(i: int) -> None:
            k = 0
            while not stop.is_set():
                t0 = time.monotonic()
                task = names[(i + k) % len(names)]
                png = {"content-type": "image/png"}
                r = await client.post(f"/predict/{task}", content=image, headers=png)
                answers.append((t0, time.monotonic(), r.status_code))
                k += 1

        workers = [asyncio.create_task(stream(i)) for i in range(clients)]
        await asyncio.sleep(1.0)
        for _ in range(reloads):
            t0 = time.monotonic()
            r = await client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
            done.append((t0, time.monotonic(), r.status_code, r.json()))
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*workers)
    return answers, done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--reloads", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    with server.mtserve(args.bundle, None, env={"MTSERVE_ADMIN_TOKEN": TOKEN}) as (port, _):
        url = f"http://127.0.0.1:{port}"
        info = httpx.get(url + "/tasks").json()
        names = [t["name"] for t in info["tasks"]]
        run = load_and_reload(url, names, buf.getvalue(), args.clients, args.reloads)
        answers, reloads = asyncio.run(run)
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
