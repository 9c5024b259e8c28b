"""Request bodies, built once per task: JPEG, Triton binary FP32 tensor, JSON base64 (LitServe too)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np

from contract.manifest import Manifest
from service.bench.loadgen import http_post


def image(manifest: Manifest, seed: int, scale: float = 1.15) -> bytes:
    """A smooth synthetic photo-like JPEG a little larger than the model input (so it is resized)."""
    from PIL import Image

    _, h, w = manifest.input.size
    h, w = int(h * scale), int(w * scale)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + seed), np.cos(5 * yy - seed), np.sin(4 * (xx + yy))], -1)
    pixels = np.clip(127 + 90 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def jpeg_requests(manifest: Manifest, tasks: list[str]) -> dict[str, bytes]:
    """``POST /predict/{task}?top_k=1`` with a raw JPEG body."""
    return {
        t: http_post(f"/predict/{t}?top_k=1", image(manifest, k), "image/jpeg") for k, t in enumerate(tasks)
    }


def json_requests(manifest: Manifest, tasks: list[str], litserve: bool = False) -> dict[str, bytes]:
    """The same JPEG as JSON base64: mtserve ``/predict/{task}``, or LitServe ``/predict`` with the task
    in the body (the identical bytes of image for both servers)."""
    out = {}
    for k, t in enumerate(tasks):
        b64 = base64.b64encode(image(manifest, k)).decode()
        if litserve:
            out[t] = http_post("/predict", json.dumps({"task": t, "image": b64}).encode(), "application/json")
        else:
            body = json.dumps({"image": b64}).encode()
            out[t] = http_post(f"/predict/{t}?top_k=1", body, "application/json")
    return out


def tensor_requests(
    manifest: Manifest, tasks: list[str], rows: int = 1, encoding: str = "binary"
) -> dict[str, bytes]:
    """``POST /v2/models/{task}/infer``: preprocessed FP32 rows, top-1; ``binary``: the Triton binary
    tensor extension, ``json``: the tensor as a JSON list."""
    out = {}
    for k, t in enumerate(tasks):
        x = np.random.default_rng(k).normal(size=(rows, *manifest.input.size)).astype("<f4")
        inp = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
        outputs = [{"name": "probabilities", "parameters": {"classification": 1}}]
        path = f"/v2/models/{t}/infer"
        if encoding == "json":
            body = json.dumps({"inputs": [inp | {"data": x.ravel().tolist()}], "outputs": outputs}).encode()
            out[t] = http_post(path, body, "application/json")
            continue
        header = json.dumps(
            {"inputs": [inp | {"parameters": {"binary_data_size": x.nbytes}}], "outputs": outputs}
        ).encode()
        extra = {"Inference-Header-Content-Length": str(len(header))}
        out[t] = http_post(path, header + x.tobytes(), "application/octet-stream", extra)
    return out
