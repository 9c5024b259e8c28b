"""The HTTP API on a fake engine (no onnxruntime): every input form, every error code, /metrics."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import re
import time

import httpx
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from service.app import create_app
from service.preprocess import load_image
from service.settings import Settings
from tests.fakes import FakeEngine, fake_logits


def encode(fmt: str, size=(40, 30), mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


PNG, JPEG, WEBP = encode("PNG"), encode("JPEG", seed=1), encode("WEBP", seed=2)


def settings(**kw) -> Settings:
    base = {
        "bundle": "unused",
        "max_wait_ms": 1,
        "max_body_mb": 1,
        "max_images_per_request": 4,
        "max_pixels": 10**6,
    }
    return Settings(**(base | kw))


@pytest_asyncio.fixture(loop_scope="function")
async def served(request):
    """(client, app, engine) for a fake-engine app; parametrise with indirect settings overrides."""
    overrides = getattr(request, "param", {})
    engine = FakeEngine(fail_start=overrides.pop("fail_start", None))
    app = create_app(settings(**overrides), engine=engine)
    async with app.router.lifespan_context(app):
        await app.state.service.wait_ready()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, app, engine


@pytest.fixture
def client(served):
    return served[0]


def expected_probs(blob: bytes, task: str, app) -> np.ndarray:
    m = app.state.service.manifest
    z = fake_logits(load_image(blob, m.input, 10**8), task, len(m.tasks[task].labels)).astype(np.float64)
    p = np.exp(z - z.max())
    return p / p.sum()


def check_prediction(body: dict, task: str, n: int, k: int = 5) -> None:
    assert body["task"] == task and body["model_version"] == "7"
    assert len(body["predictions"]) == n
    for pred in body["predictions"]:
        top = pred["top_k"]
        assert len(top) == k
        assert all(top[i]["score"] >= top[i + 1]["score"] for i in range(k - 1))
        assert all(t["label"] == f"{task}_{t['index']}" for t in top)


# -- input forms -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("blob", "ctype"), [(JPEG, "image/jpeg"), (PNG, "image/png"), (WEBP, "image/webp")])
async def test_raw_body(served, blob, ctype):
    client, app, _ = served
    r = await client.post("/predict/digits", content=blob, headers={"content-type": ctype})
    assert r.status_code == 200, r.text
    check_prediction(r.json(), "digits", 1)
    best = r.json()["predictions"][0]["top_k"][0]
    want = expected_probs(blob, "digits", app)
    assert best["index"] == int(want.argmax()) and abs(best["score"] - want.max()) < 1e-6


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
async def test_any_mode_becomes_rgb(client, mode):
    blob = encode("TIFF" if mode in ("CMYK", "I;16") else "PNG", mode=mode)
    r = await client.post("/predict/shapes", content=blob, headers={"content-type": "image/tiff"})
    assert r.status_code == 200, r.text
    check_prediction(r.json(), "shapes", 1, k=4)  # top_k clipped to the task's 4 labels


async def test_multipart_one_and_several(client):
    r = await client.post("/predict/animals", files={"file": ("a.png", PNG, "image/png")})
    assert r.status_code == 200, r.text
    check_prediction(r.json(), "animals", 1)
    files = [("file", ("a.png", PNG, "image/png")), ("file", ("b.jpg", JPEG, "image/jpeg"))]
    r = await client.post("/predict/animals", files=files, params={"top_k": 3})
    assert r.status_code == 200, r.text
    check_prediction(r.json(), "animals", 2, k=3)


async def test_json_image_and_images(client):
    b64 = base64.b64encode(PNG).decode()
    r = await client.post("/predict/digits", json={"image": b64})
    check_prediction(r.json(), "digits", 1)
    r = await client.post(
        "/predict/digits", json={"images": [b64, "data:image/png;base64," + b64], "top_k": 2}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    check_prediction(body, "digits", 2, k=2)
    assert body["predictions"][0] == body["predictions"][1]


async def test_top_k_all_gives_full_precision_scores(served):
    client, app, _ = served
    r = await client.post(
        "/predict/digits", content=PNG, headers={"content-type": "image/png"}, params={"top_k": 99}
    )
    scores = {t["index"]: t["score"] for t in r.json()["predictions"][0]["top_k"]}
    want = expected_probs(PNG, "digits", app)
    assert len(scores) == 10 and max(abs(scores[i] - want[i]) for i in range(10)) < 1e-6


def tensor_request(x: np.ndarray, **extra) -> dict:
    return {
        "id": "r1",
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
    } | extra


async def test_v2_fp32_tensor(served):
    client, _app, _ = served
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    r = await client.post("/v2/models/shapes/infer", json=tensor_request(x))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "shapes" and body["model_version"] == "7" and body["id"] == "r1"
    (out,) = body["outputs"]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32" and out["shape"] == [3, 4]
    got = np.asarray(out["data"]).reshape(3, 4)
    for i in range(3):
        z = fake_logits(x[i], "shapes", 4).astype(np.float64)
        assert np.allclose(got[i], np.exp(z - z.max()) / np.exp(z - z.max()).sum(), atol=1e-6)


async def test_v2_nested_data_and_versioned_route(client):
    x = np.zeros((1, 3, 32, 32), np.float32)
    req = {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": x.tolist()}]}
    r = await client.post("/v2/models/digits/versions/7/infer", json=req)
    assert r.status_code == 200, r.text
    assert (await client.post("/v2/models/digits/versions/8/infer", json=req)).status_code == 404


async def test_v2_classification_like_triton(client):
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    outputs = [{"name": "probabilities", "parameters": {"classification": 3}}]
    r = await client.post("/v2/models/animals/infer", json=tensor_request(x, outputs=outputs))
    (out,) = r.json()["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [2, 3]
    for s in out["data"]:
        score, index, label = s.split(":")
        assert re.fullmatch(r"\d\.\d{6}", score) and label == f"animals_{index}"


async def test_v2_bytes_json_base64(client):
    data = [base64.b64encode(PNG).decode(), base64.b64encode(JPEG).decode()]
    req = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": data}]}
    r = await client.post("/v2/models/digits/infer", json=req)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [2, 10]


def binary_request(inp: dict, raw: bytes, outputs=None) -> tuple[bytes, dict]:
    inp = inp | {"parameters": {"binary_data_size": len(raw)}}
    header = json.dumps({"inputs": [inp], **({"outputs": outputs} if outputs else {})}).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "content-type": "application/octet-stream",
    }
    return header + raw, headers


async def test_v2_binary_tensor_extension(client):
    x = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype("<f4")
    body, headers = binary_request(
        {"name": "input", "shape": [2, 3, 32, 32], "datatype": "FP32"}, x.tobytes()
    )
    r_bin = await client.post("/v2/models/digits/infer", content=body, headers=headers)
    r_json = await client.post("/v2/models/digits/infer", json=tensor_request(x))
    assert r_bin.status_code == 200, r_bin.text
    assert r_bin.json()["outputs"] == r_json.json()["outputs"]
    raw = b"".join(len(b).to_bytes(4, "little") + b for b in (PNG, WEBP))
    body, headers = binary_request({"name": "image", "shape": [2, 1], "datatype": "BYTES"}, raw)
    r = await client.post("/v2/models/shapes/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text


async def test_v2_metadata_and_health(client):
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).status_code == 200
    meta = (await client.get("/v2")).json()
    assert meta["name"] == "mtserve" and "classification" in meta["extensions"]
    m = (await client.get("/v2/models/shapes")).json()
    assert m["name"] == "shapes" and m["versions"] == ["7"]
    assert {i["datatype"] for i in m["inputs"]} == {"FP32", "BYTES"}
    assert m["outputs"][0]["shape"] == [-1, 4]
    assert (await client.get("/v2/models/shapes/ready")).json()["ready"] is True
    assert (await client.get("/v2/models/nope")).status_code == 404
    assert (await client.get("/v2/models/nope/ready")).status_code == 404


async def test_tasks_health_docs(client):
    tasks = (await client.get("/tasks")).json()
    assert [t["name"] for t in tasks["tasks"]] == ["digits", "animals", "shapes"]
    one = (await client.get("/tasks/animals")).json()
    assert (
        one["num_classes"] == 10
        and one["variants"]["trunk"] == "shared"
        and one["shared_segments"] == ["trunk"]
    )
    assert (await client.get("/tasks/nope")).json()["error"]["code"] == "unknown_task"
    assert (await client.get("/healthz")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["providers"] == ["FakeExecutionProvider"]
    assert (await client.get("/docs")).status_code == 200
    assert "/predict/{task}" in (await client.get("/openapi.json")).json()["paths"]


# -- errors -----------------------------------------------------------------------------------------
def bomb(pixels: int) -> bytes:
    side = int(pixels**0.5) + 1
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, "PNG")  # compresses to almost nothing
    return buf.getvalue()


ERROR_CASES = [
    ("unknown task", "/predict/nope", {"content": PNG, "headers": {"content-type": "image/png"}}, 404),
    ("v2 unknown task", "/v2/models/nope/infer", {"json": {}}, 404),
    ("text body", "/predict/digits", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
    ("no content type", "/predict/digits", {"content": PNG}, 415),
    (
        "undecodable",
        "/predict/digits",
        {"content": b"\x89PNG garbage", "headers": {"content-type": "image/png"}},
        422,
    ),
    (
        "truncated",
        "/predict/digits",
        {"content": JPEG[: len(JPEG) // 2], "headers": {"content-type": "image/jpeg"}},
        422,
    ),
    ("empty body", "/predict/digits", {"content": b"", "headers": {"content-type": "image/png"}}, 422),
    ("bad base64", "/predict/digits", {"json": {"image": "@@not base64@@"}}, 422),
    ("json without image", "/predict/digits", {"json": {}}, 422),
    ("json extra field", "/predict/digits", {"json": {"img": "x"}}, 422),
    (
        "malformed json",
        "/predict/digits",
        {"content": b"{", "headers": {"content-type": "application/json"}},
        422,
    ),
    (
        "top_k zero",
        "/predict/digits?top_k=0",
        {"content": PNG, "headers": {"content-type": "image/png"}},
        422,
    ),
    (
        "multipart without file",
        "/predict/digits",
        {
            "content": b'--x\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--x--\r\n',
            "headers": {"content-type": "multipart/form-data; boundary=x"},
        },
        422,
    ),
    ("too many images", "/predict/digits", {"json": {"images": [base64.b64encode(PNG).decode()] * 5}}, 413),
    ("too many files", "/predict/digits", {"files": [("file", ("a.png", PNG, "image/png"))] * 6}, 413),
    (
        "too many pixels",
        "/predict/digits",
        {"content": bomb(2_000_000), "headers": {"content-type": "image/png"}},
        413,
    ),
    (
        "body too large",
        "/predict/digits",
        {"content": b"\0" * (2 << 20), "headers": {"content-type": "image/png"}},
        413,
    ),
    (
        "v2 bad json",
        "/v2/models/digits/infer",
        {"content": b"[1,", "headers": {"content-type": "application/json"}},
        422,
    ),
    ("v2 no inputs", "/v2/models/digits/infer", {"json": {"inputs": []}}, 422),
    (
        "v2 wrong shape",
        "/v2/models/digits/infer",
        {"json": tensor_request(np.zeros((1, 3, 8, 8), np.float32))},
        422,
    ),
    (
        "v2 too few values",
        "/v2/models/digits/infer",
        {"json": {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [1.0]}]}},
        422,
    ),
    (
        "v2 strings as fp32",
        "/v2/models/digits/infer",
        {"json": {"inputs": [{"name": "input", "shape": [1, 1, 1, 1], "datatype": "FP32", "data": ["a"]}]}},
        422,
    ),
    (
        "v2 int8",
        "/v2/models/digits/infer",
        {"json": {"inputs": [{"name": "input", "shape": [1], "datatype": "INT8", "data": [1]}]}},
        422,
    ),
    (
        "v2 bytes not image",
        "/v2/models/digits/infer",
        {"json": {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["plain text"]}]}},
        422,
    ),
    (
        "v2 bytes numbers",
        "/v2/models/digits/infer",
        {"json": {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [1]}]}},
        422,
    ),
    (
        "v2 unknown output",
        "/v2/models/digits/infer",
        {"json": tensor_request(np.zeros((1, 3, 32, 32), np.float32), outputs=[{"name": "x"}])},
        422,
    ),
    (
        "v2 bad classification",
        "/v2/models/digits/infer",
        {
            "json": tensor_request(
                np.zeros((1, 3, 32, 32), np.float32),
                outputs=[{"name": "probabilities", "parameters": {"classification": "a"}}],
            )
        },
        422,
    ),
    (
        "v2 too many rows",
        "/v2/models/digits/infer",
        {"json": tensor_request(np.zeros((5, 3, 32, 32), np.float32))},
        413,
    ),
    (
        "v2 bad header length",
        "/v2/models/digits/infer",
        {"content": b"{}", "headers": {"Inference-Header-Content-Length": "99"}},
        422,
    ),
]


@pytest.mark.parametrize(("name", "path", "kw", "status"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
async def test_error_codes(client, name, path, kw, status):
    r = await client.post(path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] and err["message"]


async def test_nan_tensor_is_422(client):
    x = np.zeros((1, 3, 32, 32), np.float32)
    body = json.dumps(tensor_request(x)).replace("0.0", "NaN", 1)
    r = await client.post(
        "/v2/models/digits/infer", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422


@pytest.mark.parametrize(
    "served", [{"queue_size": 1, "max_batch_size": 1, "max_images_per_request": 1}], indirect=True
)
async def test_queue_full_429_with_retry_after(served):
    client, _app, engine = served
    engine.gate.clear()
    post = lambda: client.post("/predict/digits", content=PNG, headers={"content-type": "image/png"})  # noqa: E731
    admitted = []
    for _ in range(3):  # a batch blocked in the engine, the next one ready behind it, one queued
        admitted.append(asyncio.ensure_future(post()))
        await asyncio.sleep(0.1)
    r = await post()
    assert r.status_code == 429 and r.headers["retry-after"].isdigit()
    engine.gate.set()
    assert [x.status_code for x in await asyncio.gather(*admitted)] == [200, 200, 200]


@pytest.mark.parametrize("served", [{"timeout_ms": 150, "max_batch_size": 1}], indirect=True)
async def test_deadline_504_never_computed(served):
    """Queued past its deadline: 504, never computed. Computing past it (the engine blocked): 504 at the
    deadline too, not when the batch finishes."""
    client, _app, engine = served
    engine.gate.clear()
    t0 = time.perf_counter()
    first = asyncio.ensure_future(
        client.post("/predict/digits", content=PNG, headers={"content-type": "image/png"})
    )
    await asyncio.sleep(0.05)
    r = await client.post("/predict/shapes", content=PNG, headers={"content-type": "image/png"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    r = await first
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert time.perf_counter() - t0 < 1.0  # the engine is still blocked
    engine.gate.set()
    await asyncio.sleep(0.05)
    assert all("shapes" not in c for c in engine.calls)


@pytest.mark.parametrize("served", [{"fail_start": "no such provider"}], indirect=True)
async def test_not_ready_503(served):
    client, _app, _ = served
    r = await client.post("/predict/digits", content=PNG, headers={"content-type": "image/png"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    ready = await client.get("/readyz")
    assert ready.status_code == 503 and "no such provider" in ready.json()["error"]["message"]
    assert (await client.get("/v2/health/ready")).status_code == 503
    assert (await client.get("/v2/models/digits/ready")).status_code == 503


async def test_draining_answers_503(served):
    client, app, _ = served
    app.state.service.draining = True
    r = await client.post(
        "/v2/models/digits/infer", json=tensor_request(np.zeros((1, 3, 32, 32), np.float32))
    )
    assert r.status_code == 503
    assert (await client.get("/readyz")).status_code == 503


async def test_garbage_never_500(client):
    rng = random.Random(0)
    types = [
        "image/png",
        "image/jpeg",
        "application/json",
        "multipart/form-data; boundary=x",
        "text/plain",
        "",
    ]
    paths = ["/predict/digits", "/v2/models/shapes/infer"]
    seeds = [b"", b"{}", b'{"inputs": [{}]}', PNG[:40], JPEG[:100], b"--x\r\n", b"\xff" * 64]
    for _ in range(60):
        body = rng.choice(seeds) + bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        headers = {"content-type": rng.choice(types)} if rng.random() < 0.9 else {}
        r = await client.post(rng.choice(paths), content=body, headers=headers)
        assert r.status_code < 500, (r.status_code, r.text)
        assert "error" in r.json()


# -- metrics ----------------------------------------------------------------------------------------
async def test_metrics(client):
    await client.post("/predict/digits", content=PNG, headers={"content-type": "image/png"})
    await client.post("/predict/digits", content=b"x", headers={"content-type": "text/plain"})
    await client.post("/predict/nope", content=PNG, headers={"content-type": "image/png"})
    text = (await client.get("/metrics")).text
    for name in [
        "mtserve_requests_total",
        "mtserve_request_duration_seconds_bucket",
        "mtserve_queue_duration_seconds_bucket",
        "mtserve_preprocess_duration_seconds_bucket",
        "mtserve_segment_duration_seconds_bucket",
        "mtserve_batch_size_bucket",
        "mtserve_batch_tasks_bucket",
        "mtserve_queue_depth",
        "mtserve_model_info",
    ]:
        assert name in text, name
    assert 'mtserve_requests_total{code="200",task="digits"} 1.0' in text
    assert 'mtserve_requests_total{code="415",task="digits"} 1.0' in text
    assert 'mtserve_model_info{bundle="fake",providers="FakeExecutionProvider",version="7"} 1.0' in text
    assert 'mtserve_batch_size_bucket{le="32.0",segment="trunk"}' in text
    assert "nope" not in text  # unknown tasks never make a label


async def test_mixed_tasks_share_trunk_batches(served):
    client, _app, engine = served
    engine.gate.clear()
    posts = [
        asyncio.ensure_future(
            client.post(f"/predict/{t}", content=PNG, headers={"content-type": "image/png"})
        )
        for t in ["digits", "animals", "shapes"] * 3
    ]
    await asyncio.sleep(0.2)
    engine.gate.set()
    assert {r.status_code for r in await asyncio.gather(*posts)} == {200}
    text = (await client.get("/metrics")).text
    count = float(re.search(r"^mtserve_batch_tasks_count (\S+)", text, re.M).group(1))
    single = float(re.search(r'^mtserve_batch_tasks_bucket\{le="1.0"\} (\S+)', text, re.M).group(1))
    assert count > single  # some trunk batch held rows of more than one task
