"""A reload starts no thread of its own but the new version's engine thread (results/add-task, resident
memory): the bundle is verified in the heap trimmer's thread (service/heap.py), not in the event loop's
default executor, whose idle thread would stay for the rest of the process, nor in a thread of its own,
whose stack would stay in glibc's cache, partly resident."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import pytest

from contract.errors import BundleError
from service.heap import HeapTrimmer, default_trimmer
from tests.test_reload import AUTH, make_model_dir, predict, settings


def _threads() -> Counter:
    # anyio's worker threads (sync routes, run_in_threadpool) come and go by themselves
    return Counter(t.name for t in threading.enumerate() if not t.name.startswith("AnyIO"))


def test_submit_runs_in_the_trimmers_thread_trimming_or_not(monkeypatch):
    monkeypatch.setenv("MTSERVE_TRIM_HEAP", "0")  # the thread serves submit() even then
    trimmer = HeapTrimmer(lambda pad: 1)
    assert trimmer.submit(lambda x: (x + 1, threading.current_thread().name), 1).result(10)[0] == 2
    assert trimmer.submit(lambda: threading.current_thread().name).result(10).startswith("mtserve-heap-trim")

    def fail() -> None:
        raise BundleError("refused")

    with pytest.raises(BundleError, match="refused"):
        trimmer.submit(fail).result(10)
    assert trimmer.trims == 0


async def test_a_reload_starts_no_thread_but_the_new_versions_engine_thread(tmp_path, tiny_bundle):
    pytest.importorskip("onnxruntime")
    import httpx

    from service.app import create_app

    models = make_model_dir(tmp_path, tiny_bundle)
    app = create_app(settings(models / "v1", model_dir=models))
    service = app.state.service
    built_in: list[str] = []
    factory = service.engine_factory

    def recording_factory(path):
        built_in.append(threading.current_thread().name)
        return factory(path)

    service.engine_factory = recording_factory
    default_trimmer().submit(lambda: None).result(10)  # the process's background thread exists
    async with app.router.lifespan_context(app):
        assert await service.wait_ready()
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
            # the new version's engine thread replaced the old one's; nothing else was started
            assert _threads() == before, (_threads() - before, before - _threads())
            assert asyncio.get_running_loop()._default_executor is None  # type: ignore[attr-defined]
    assert len(built_in) == 1 and built_in[0].startswith("mtserve-heap-trim")
