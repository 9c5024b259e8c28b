"""Live reload (POST /admin/reload) in process, on real tiny bundles and the real onnxruntime engine:
auth, path confinement, corrupt and incompatible bundles refused with the old version serving,
the swap (versions reported, metrics), requests admitted before the swap finishing on the old
version, one reload at a time."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import re
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
from pydantic import ValidationError

from service.app import create_app
from service.settings import Settings
from tests.test_service_api import PNG, tensor_request

TOKEN = "test-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def set_version(bundle: Path, version: str) -> Path:
    """The manifest's version is not covered by any sha256: a copy with another version is a valid bundle."""
    edit_manifest(bundle, lambda m: m.update(version=version))
    return bundle


def edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def make_model_dir(root: Path, tiny_bundle: Path, extra_versions: tuple[str, ...] = ()) -> Path:
    """root/models: v1 (the session's tiny bundle, version "1"), v2 (other weights, version "2"),
    then copies of v2 with the versions in ``extra_versions``."""
    from tests.conftest import build_tiny_bundle

    models = root / "models"
    models.mkdir(parents=True)
    shutil.copytree(tiny_bundle, models / "v1")
    build_tiny_bundle(models / "v2", version="2", seed=1)
    for v in extra_versions:
        set_version(shutil.copytree(models / "v2", models / f"v{v}"), v)
    return models


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_bundle) -> Path:
    models = make_model_dir(tmp_path_factory.mktemp("reload"), tiny_bundle)
    outside = models.parent / "outside"
    shutil.copytree(models / "v2", outside / "v2")
    (models / "link-out").symlink_to(outside / "v2", target_is_directory=True)
    (models / "link-in").symlink_to(models / "v2", target_is_directory=True)
    return models


def settings(bundle: Path, **kw) -> Settings:
    base = {"bundle": bundle, "admin_token": TOKEN, "threads": 1, "max_batch_size": 4, "max_wait_ms": 1}
    return Settings(**(base | kw))


@pytest_asyncio.fixture(loop_scope="function")
async def served(models, tmp_path, request):
    """(client, app) serving a fresh copy of v1 at models/current-<test>; model dir = models;
    parametrise (indirect) with settings overrides."""
    current = models / f"current-{tmp_path.name}"
    shutil.copytree(models / "v1", current)
    app = create_app(settings(current, model_dir=models, **getattr(request, "param", {})))
    async with app.router.lifespan_context(app):
        assert await app.state.service.wait_ready()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield client, app
    shutil.rmtree(current)


async def predict(client: httpx.AsyncClient, task: str = "digits") -> httpx.Response:
    return await client.post(f"/predict/{task}", content=PNG, headers={"content-type": "image/png"})


async def reload(client: httpx.AsyncClient, bundle: str | None = None, headers=AUTH) -> httpx.Response:
    body = {"json": {"bundle": bundle}} if bundle is not None else {}
    return await client.post("/admin/reload", headers=headers, **body)


async def assert_serving(client: httpx.AsyncClient, version: str) -> None:
    r = await predict(client)
    assert r.status_code == 200 and r.json()["model_version"] == version, r.text
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["version"] == version
    model = (await client.get("/admin/model", headers=AUTH)).json()
    assert model["version"] == version and model["reload_in_progress"] is False
    text = (await client.get("/metrics")).text
    info = re.findall(r'^mtserve_model_info\{[^}]*version="([^"]+)"[^}]*\} 1.0$', text, re.M)
    assert info == [version]


def scores(body: dict) -> np.ndarray:
    v = np.zeros(10)
    for t in body["predictions"][0]["top_k"]:
        v[t["index"]] = t["score"]
    return v


# -- auth -------------------------------------------------------------------------------------------
async def test_admin_routes_absent_without_a_token(models):
    app = create_app(settings(models / "v1", admin_token=None))
    transport = httpx.ASGITransport(app=app)
    client = httpx.AsyncClient(transport=transport, base_url="http://t")
    async with app.router.lifespan_context(app), client as c:
        await app.state.service.wait_ready()
        for r in (await c.post("/admin/reload", headers=AUTH), await c.get("/admin/model", headers=AUTH)):
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert not [p for p in (await c.get("/openapi.json")).json()["paths"] if p.startswith("/admin")]


async def test_bearer_token_required(served):
    client, _ = served
    for headers in ({}, {"Authorization": "Basic " + TOKEN}, {"Authorization": "Bearer"}):
        r = await client.get("/admin/model", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (headers, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
    for token in (TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "é" + TOKEN[1:]):
        r = await client.get("/admin/model", headers={"Authorization": f"Bearer {token}".encode()})
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    # authentication comes first: a bad body or a bad path from a stranger learns nothing
    r = await client.post("/admin/reload", content=b"{not json", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = await reload(client, "../outside/v2", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = await client.get("/admin/model", headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == "1" and r.json()["reloads"] == 0
    assert r.json()["tasks"] == ["digits", "animals", "shapes"]
    assert "/admin/reload" in (await client.get("/openapi.json")).json()["paths"]
    r = await client.post("/admin/reload", content=b"{not json", headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
    r = await client.post("/admin/reload", json={"bundle": "v2", "force": True}, headers=AUTH)
    assert r.status_code == 422


def test_token_settings(tmp_path, monkeypatch):
    secret = tmp_path / "token"
    secret.write_text(f"  {TOKEN}\n")
    monkeypatch.setenv("MTSERVE_ADMIN_TOKEN_FILE", str(secret))
    s = Settings(bundle=tmp_path / "b")
    assert s.admin_token.get_secret_value() == TOKEN  # read at start-up, stripped
    assert TOKEN not in repr(s) and TOKEN not in str(s.model_dump())
    assert s.models_root() == tmp_path.resolve()  # default: the bundle's parent
    with pytest.raises(ValidationError, match="not both"):
        Settings(bundle=tmp_path / "b", admin_token=TOKEN)
    monkeypatch.delenv("MTSERVE_ADMIN_TOKEN_FILE")
    with pytest.raises(ValidationError, match="unreadable"):
        Settings(bundle=tmp_path / "b", admin_token_file=tmp_path / "missing")
    assert Settings(bundle=tmp_path / "b", admin_token="").admin_token is None  # compose's ${VAR:-}
    for weak in (" ", "short", "has a space in it, long enough"):
        with pytest.raises(ValidationError, match="at least 16"):
            Settings(bundle=tmp_path / "b", admin_token=weak)


# -- refusals: nothing loaded, the old version serves on -------------------------------------------
@pytest.mark.parametrize("path", ["../outside/v2", "OUTSIDE_ABS", "link-out", "v2/../../outside/v2", "/etc"])
async def test_path_outside_the_model_dir_is_refused(served, models, path):
    client, app = served
    path = str(models.parent / "outside" / "v2") if path == "OUTSIDE_ABS" else path
    r = await reload(client, path)
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "forbidden" and "outside the model directory" in err["message"]
    assert app.state.service.reloads == 0
    await assert_serving(client, "1")


def _flip_byte(b: Path) -> str:
    f = next((b / "segments").rglob("*.onnx"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return f.name


def _missing_file(b: Path) -> str:
    f = next((b / "segments").rglob("*.onnx"))
    f.unlink()
    return f.name


def _not_onnx(b: Path) -> str:
    """Garbage with a matching sha256: passes verification, refused by onnxruntime during the load."""
    rel = "segments/head/shapes.onnx"
    (b / rel).write_bytes(b"not an onnx model")

    def change(m):
        for seg in m["segments"]:
            for v in seg["variants"].values():
                if v["file"] == rel:
                    v["sha256"] = hashlib.sha256(b"not an onnx model").hexdigest()

    edit_manifest(b, change)
    return "shapes.onnx"


def _broken_json(b: Path) -> str:
    p = b / "manifest.json"
    p.write_text(p.read_text()[:100])
    return "manifest.json: not valid JSON"


def _bad_field(b: Path) -> str:
    edit_manifest(b, lambda m: m.pop("version"))
    return "field version"


def _shapes_do_not_chain(b: Path) -> str:
    edit_manifest(b, lambda m: m["segments"][1].update(input_shape=[7, 7, 7]))
    return "segments[0].output_shape"


CORRUPT = {
    "sha256": (_flip_byte, "sha256"),
    "missing_file": (_missing_file, "missing"),
    "not_onnx": (_not_onnx, "onnxruntime cannot load"),
    "broken_manifest": (_broken_json, ""),
    "manifest_field": (_bad_field, ""),
    "shapes": (_shapes_do_not_chain, ""),
}


@pytest.mark.parametrize("kind", [*CORRUPT, "not_a_bundle"])
async def test_corrupt_bundle_is_refused_and_the_old_version_serves_on(served, models, tmp_path, kind):
    client, app = served
    name = f"bad-{kind}-{tmp_path.name}"
    if kind == "not_a_bundle":
        (models / name).mkdir()
        expect = ["manifest.json", "missing"]
    else:
        shutil.copytree(models / "v2", models / name)
        corrupt, what = CORRUPT[kind]
        expect = [corrupt(models / name), what]
    r = await reload(client, name)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_bundle" and str(models / name) in err["message"]
    assert all(e in err["message"] for e in expect), err["message"]
    assert app.state.service.reloads == 0 and not app.state.service.retiring
    await assert_serving(client, "1")


async def test_unresolvable_path_and_failing_warmup_are_refused(models, tmp_path):
    """Not only BundleError: a symlink loop, or an engine failing during warm-up (e.g. out of
    memory) is a refused bundle (422), never a 500; the half-loaded version is released."""
    from service.app import build_engine

    started = []

    def factory(path):
        engine = build_engine(app.state.service.settings, path)

        def start():
            started.append(engine)
            raise RuntimeError("out of memory while warming up")

        engine.start = start
        return engine

    current = shutil.copytree(models / "v1", tmp_path / "models" / "v1")
    shutil.copytree(models / "v2", tmp_path / "models" / "v2")
    (tmp_path / "models" / "loop").symlink_to(tmp_path / "models" / "loop")
    app = create_app(settings(current), engine_factory=factory)
    transport = httpx.ASGITransport(app=app)
    client = httpx.AsyncClient(transport=transport, base_url="http://t")
    async with app.router.lifespan_context(app), client:
        assert await app.state.service.wait_ready()
        r = await reload(client, "loop")
        assert r.status_code == 422 and "cannot be resolved" in r.json()["error"]["message"], r.text
        r = await reload(client, "v2")
        assert r.status_code == 422 and "out of memory while warming up" in r.json()["error"]["message"]
        assert len(started) == 1 and not app.state.service.retiring
        await assert_serving(client, "1")


def _drop_task(m: dict) -> None:
    del m["tasks"]["shapes"]


def _relabel(m: dict) -> None:
    m["tasks"]["digits"]["labels"][3] = "three"


def _new_mean(m: dict) -> None:
    m["input"]["mean"] = [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (_drop_task, "field tasks lacks ['shapes']"),
        (_relabel, "tasks.digits.labels"),
        (_new_mean, "input.mean"),
    ],
)
async def test_incompatible_bundle_is_refused(served, models, tmp_path, change, field):
    client, app = served
    name = f"incompatible-{tmp_path.name}"
    edit_manifest(shutil.copytree(models / "v2", models / name), change)
    r = await reload(client, name)
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] == "incompatible_bundle" and field in err["message"], err["message"]
    assert app.state.service.reloads == 0
    await assert_serving(client, "1")


# -- the swap ---------------------------------------------------------------------------------------
async def test_reload_switches_the_version_everywhere(served, models):
    client, app = served
    old_engine = app.state.service.engine
    before = await predict(client)
    assert gc.get_freeze_count() > 0  # start-up froze what it built
    r = await reload(client, "link-in")  # a symlink that stays inside the model dir is fine
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["version"], body["previous_version"], body["bundle"]) == ("2", "1", "tiny")
    assert body["path"] == str((models / "v2").resolve())
    assert body["verify_s"] > 0 and body["warmup_s"] > 0 and body["total_s"] < 60
    assert old_engine.sessions == {}  # the old version's sessions are released once drained
    assert gc.get_freeze_count() == 0  # what start-up froze (the old version with it) is collectable

    after = await predict(client)
    assert after.json()["model_version"] == "2"
    assert np.abs(scores(after.json()) - scores(before.json())).max() > 1e-4  # other weights compute it
    x = np.zeros((1, 3, 32, 32), np.float32)
    r = await client.post("/v2/models/shapes/infer", json=tensor_request(x))
    assert r.status_code == 200 and r.json()["model_version"] == "2"
    for version, status in (("1", 404), ("2", 200)):
        r = await client.post(f"/v2/models/shapes/versions/{version}/infer", json=tensor_request(x))
        assert r.status_code == status
    assert (await client.get("/v2/models/digits")).json()["versions"] == ["2"]
    assert (await client.get("/v2/models/digits/versions/1/ready")).status_code == 404
    assert (await client.get("/tasks")).json()["version"] == "2"
    model = (await client.get("/admin/model", headers=AUTH)).json()
    assert model["reloads"] == 1 and model["path"] == str((models / "v2").resolve())
    await assert_serving(client, "2")  # model_info: the old series is gone, one series left
    text = (await client.get("/metrics")).text
    assert 'mtserve_requests_total{code="200",task="digits"} 3.0' in text  # counters carry on


async def test_reload_without_body_rereads_the_configured_bundle(served, models):
    """The configured path is the source of truth (as on a restart): replace its files, reload."""
    client, app = served
    current = app.state.service.settings.bundle
    assert (await reload(client, "v2")).json()["version"] == "2"
    shutil.rmtree(current)
    set_version(shutil.copytree(models / "v2", current), "3")
    r = await reload(client)
    assert r.status_code == 200 and r.json()["version"] == "3" and r.json()["previous_version"] == "2"
    assert r.json()["path"] == str(current.resolve())
    await assert_serving(client, "3")


async def test_reload_may_add_a_task(served, models, tmp_path):
    client, _ = served
    name = f"superset-{tmp_path.name}"

    def add_task(m):
        m["tasks"]["digits2"] = m["tasks"]["digits"]

    edit_manifest(shutil.copytree(models / "v2", models / name), add_task)
    assert (await predict(client, "digits2")).status_code == 404
    r = await reload(client, name)
    assert r.status_code == 200, r.text
    r = await predict(client, "digits2")
    assert r.status_code == 200 and r.json()["model_version"] == "2"
    text = (await client.get("/metrics")).text
    assert 'mtserve_requests_total{code="200",task="digits2"} 1.0' in text
    assert 'mtserve_queue_duration_seconds_count{task="digits2"} 1.0' in text
    assert 'mtserve_requests_total{code="404",task="digits2"}' not in text  # unknown then: no label


async def test_requests_admitted_before_the_swap_finish_on_the_old_version(served):
    client, app = served
    service = app.state.service
    old = service.engine
    infer, entered, gate = old.infer, threading.Event(), threading.Event()

    def gated(x, tasks):
        entered.set()
        assert gate.wait(30)
        return infer(x, tasks)

    old.infer = gated
    first = asyncio.ensure_future(predict(client, "animals"))
    assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
    swap = asyncio.ensure_future(reload(client, "v2"))
    for _ in range(600):  # the new version serves while the old one still computes `first`
        if (await client.get("/admin/model", headers=AUTH)).json()["version"] == "2":
            break
        await asyncio.sleep(0.05)
    assert service.unit.version == "2" and not swap.done() and not first.done()
    assert (await client.get("/readyz")).json()["version"] == "2"
    r = await predict(client, "animals")
    assert r.status_code == 200 and r.json()["model_version"] == "2"
    assert (await reload(client, "v1")).status_code == 409  # the first reload is still draining
    gate.set()
    r = await first
    assert r.status_code == 200 and r.json()["model_version"] == "1"
    r = await swap
    assert r.status_code == 200 and r.json()["drain_s"] > 0
    assert old.sessions == {} and not service.retiring


@pytest.mark.parametrize("served", [{"timeout_ms": 300}], indirect=True)
async def test_a_request_stuck_past_its_deadline_does_not_hold_the_old_version(served):
    """A client still sending its body when its deadline passes (slowloris) is answered 504 then, which
    releases the old version: the reload's drain does not wait for that client."""
    client, app = served
    service, release = app.state.service, asyncio.Event()

    async def slow_body():
        await release.wait()
        yield PNG

    headers = {"content-type": "image/png"}
    stuck = asyncio.ensure_future(client.post("/predict/digits", content=slow_body(), headers=headers))
    for _ in range(200):
        if service.unit.leases:
            break
        await asyncio.sleep(0.01)
    assert service.unit.leases == 1
    r = await reload(client, "v2")
    assert r.status_code == 200 and r.json()["drain_s"] < 1, r.text
    assert (await predict(client)).json()["model_version"] == "2"
    r = await asyncio.wait_for(stuck, 5)  # answered without the rest of its body
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert not release.is_set()


async def test_one_reload_at_a_time(served):
    client, app = served
    a, b = await asyncio.gather(reload(client, "v2"), reload(client, "v2"))
    assert sorted([a.status_code, b.status_code]) == [200, 409]
    conflict = a if a.status_code == 409 else b
    err = conflict.json()["error"]
    assert err["code"] == "conflict" and "in progress" in err["message"]
    assert app.state.service.reloads == 1
    await assert_serving(client, "2")


async def test_no_reload_while_shutting_down(served):
    client, app = served
    app.state.service.draining = True
    r = await reload(client, "v2")
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    app.state.service.draining = False
