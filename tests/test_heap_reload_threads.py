"""A reload leaves no thread behind (results/add-task, resident memory): the bundle is verified in a
thread that ends with it, not in the event loop's default executor, whose idle thread would stay for
the rest of the process (its stack and malloc cache resident)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import pytest

from contract.errors import BundleError
from service.server_state import in_own_thread
from tests.test_reload import AUTH, make_model_dir, predict, settings


def _threads() -> Counter:
    # anyio's worker threads (sync routes, run_in_threadpool) come and go by themselves
    return Counter(t.name for t in threading.enumerate() if not t.name.startswith("AnyIO"))


async def test_in_own_thread_returns_raises_and_the_thread_ends():
    names: list[str] = []

    def work(x: int) -> int:
        names.append(threading.current_thread().name)
        return x + 1

    before = _threads()
    assert await in_own_thread(work, 1) == 2
    assert names == ["mtserve-reload-verify"]

    def fail() -> None:
        raise BundleError("refused")

    with pytest.raises(BundleError, match="refused"):
        await in_own_thread(fail)
    for _ in range(100):  # the threads have handed their result over; they end right after
        if _threads() == before:
            break
        await asyncio.sleep(0.01)
    assert _threads() == before
    assert asyncio.get_running_loop()._default_executor is None  # type: ignore[attr-defined]


async def test_a_reload_leaves_no_thread_behind(tmp_path, tiny_bundle):
    pytest.importorskip("onnxruntime")
    import httpx

    from service.app import create_app

    models = make_model_dir(tmp_path, tiny_bundle)
    app = create_app(settings(models / "v1", model_dir=models))
    async with app.router.lifespan_context(app):
        assert await app.state.service.wait_ready()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            assert (await predict(client)).status_code == 200
            before = _threads()
            r = await client.post("/admin/reload", headers=AUTH, json={"bundle": "v2"})
            assert r.status_code == 200, r.text
            assert (await predict(client)).json()["model_version"] == "2"
            for _ in range(100):
                if _threads() == before:
                    break
                await asyncio.sleep(0.01)
            # the new version's engine thread replaced the old one's; nothing else stays
            assert _threads() == before, (_threads() - before, before - _threads())
