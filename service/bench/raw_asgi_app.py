"""The floor for ``mtserve bench api-cpu``: a minimal raw-ASGI app under uvicorn that does what a
``/predict`` request costs us outside the engine, and nothing else.

``POST /predict/{task}[?top_k=k]`` with a raw image body: the body is read, decoded and preprocessed
by the project's own function (:func:`service.preprocess.load_image`, the manifest's input spec) in a
thread pool of the same size as the server's (``--inline``: on the event loop), and answered with the
same JSON as ``/predict`` (top-k with labels, orjson) of a fixed probability vector per task: no
engine, no batcher, no validation beyond what decoding does, no metrics, no deadline.

``POST /v2/models/{task}/infer`` with a preprocessed FP32 tensor (Triton's binary tensor extension):
the JSON header is read (orjson), the rows taken as a view of the body and checked finite, and the
answer is ``/v2``'s classification JSON (top-1) of the fixed vector.

    python -m service.bench.raw_asgi_app BUNDLE --port 8001 [--inline] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson

from contract.bundle import load_bundle
from service.postprocess import top_k
from service.preprocess import load_image

MAX_PIXELS = 40_000_000
HEADERS = [(b"content-type", b"application/json")]


def probabilities(n: int, seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).normal(size=n)
    p = np.exp(z - z.max())
    return p / p.sum()


def make_app(bundle: str, workers: int, inline: bool = False):
    """The ASGI callable: lifespan answered, a GET answers 200 (readiness), a POST is a /predict."""
    manifest = load_bundle(bundle, verify_sha256=False).manifest
    spec, version = manifest.input, manifest.version
    tasks = {
        t: (list(s.labels), probabilities(len(s.labels), i))
        for i, (t, s) in enumerate(manifest.tasks.items())
    }
    pool = ThreadPoolExecutor(workers, thread_name_prefix="raw-decode")

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (kind := (await receive())["type"]) == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": f"{kind}.complete"})
        if scope["method"] != "POST":  # readiness probe
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            return await send({"type": "http.response.body", "body": b'{"status":"ready"}'})
        task = scope["path"].rpartition("/")[2]
        query = scope["query_string"]
        k = int(query.rpartition(b"=")[2]) if query.startswith(b"top_k=") else 5
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if scope["path"].endswith("/infer"):
            return await send_v2(send, scope, body, tasks)
        if inline:
            x = load_image(body, spec, MAX_PIXELS)
        else:
            x = await asyncio.get_running_loop().run_in_executor(pool, load_image, body, spec, MAX_PIXELS)
        labels, p = tasks.get(task) or next(iter(tasks.values()))
        assert x.ndim == 3
        answer = {"task": task, "model_version": version, "predictions": [{"top_k": top_k(p, labels, k)}]}
        out = orjson.dumps(answer)
        head = [(b"content-length", b"%d" % len(out)), *HEADERS]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": out})

    return app


async def send_v2(send, scope, body: bytes, tasks: dict) -> None:
    """The ``/v2`` infer answer of the binary request ``body`` (top-1 classification of the fixed vector)."""
    task = scope["path"].split("/")[3]
    length = int(dict(scope["headers"])[b"inference-header-content-length"])
    spec = orjson.loads(body[:length])["inputs"][0]
    x = np.frombuffer(body, "<f4", offset=length).reshape(spec["shape"])
    assert np.isfinite(x).all()
    labels, p = tasks.get(task) or next(iter(tasks.values()))
    best = int(np.argmax(p))
    data = [f"{p[best]:f}:{best}:{labels[best]}"] * len(x)
    output = {"name": "probabilities", "shape": [len(x), 1], "datatype": "BYTES", "data": data}
    out = orjson.dumps({"model_name": task, "model_version": "1", "id": None, "outputs": [output]})
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"%d" % len(out)), *HEADERS],
        }
    )
    await send({"type": "http.response.body", "body": out})


def main(argv: list[str] | None = None) -> None:
    from contract.host import available_cpus

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--workers", type=int, default=available_cpus(), help="decode threads (as the server's)")
    p.add_argument("--inline", action="store_true", help="decode on the event loop, no thread pool")
    args = p.parse_args(argv)
    import uvicorn

    app = make_app(args.bundle, args.workers, args.inline)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
