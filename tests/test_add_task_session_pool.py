"""service/session_pool.py: sessions keyed by (sha256, options), shared across engines, refcounted."""

from __future__ import annotations

import threading

import pytest

from service.session_pool import SessionKey, SessionPool


class Engine:  # an owner
    pass


def test_same_file_and_options_is_one_session():
    pool, a, b = SessionPool(), Engine(), Engine()
    made = []

    def create(tag):
        return lambda: made.append(tag) or object()

    k1, k2 = SessionKey("a" * 64, ("cpu", 1)), SessionKey("b" * 64, ("cpu", 1))
    s1, reused1 = pool.acquire(k1, create("k1"), a)
    s2, reused2 = pool.acquire(k1, create("k1 again"), b)
    assert s1 is s2 and (reused1, reused2) == (False, True)
    other_options, _ = pool.acquire(SessionKey("a" * 64, ("cpu", 2)), create("k1 threads 2"), b)
    assert other_options is not s1
    pool.acquire(k2, create("k2"), b)
    assert made == ["k1", "k1 threads 2", "k2"]
    assert pool.stats() == {"sessions": 3, "created": 3, "reused": 1}

    assert pool.release_all(a) == 0  # b still holds k1
    assert k1 in pool and len(pool) == 3
    assert pool.release_all(b) == 3
    assert len(pool) == 0


def test_refcount_per_owner_and_release():
    pool, a = SessionPool(), Engine()
    key = SessionKey("c" * 64, ())
    pool.acquire(key, object, a)
    pool.acquire(key, object, a)  # the same file twice in one bundle
    assert pool.release(key, a) is False and key in pool
    assert pool.release(key, a) is True and key not in pool
    assert pool.release(key, a) is False  # unknown: no error


def test_failed_create_leaves_the_pool_unchanged():
    pool, a = SessionPool(), Engine()
    key = SessionKey("d" * 64, ())

    def boom():
        raise RuntimeError("cannot load")

    with pytest.raises(RuntimeError):
        pool.acquire(key, boom, a)
    assert key not in pool and pool.stats()["created"] == 0
    _session, reused = pool.acquire(key, object, a)
    assert not reused


def test_concurrent_acquire_creates_once():
    pool = SessionPool()
    key = SessionKey("e" * 64, ())
    created = []
    owners = [Engine() for _ in range(8)]
    barrier = threading.Barrier(len(owners))
    got = []

    def create():
        created.append(1)
        return object()

    def worker(owner):
        barrier.wait()
        got.append(pool.acquire(key, create, owner)[0])

    threads = [threading.Thread(target=worker, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(created) == 1 and len({id(s) for s in got}) == 1
    for o in owners[:-1]:
        pool.release_all(o)
    assert key in pool
    pool.release_all(owners[-1])
    assert key not in pool


def _with_new_task(src, dst):
    """A copy of the tiny bundle plus task ``digits2``: digits' stem and trunk, its own head file (the
    digits head with another doc string: other bytes, another sha256)."""
    import json
    import shutil

    import onnx

    from contract.bundle import sha256_file

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "segments/head/digits.onnx"))
    model.doc_string = "digits2"
    onnx.save(model, str(dst / "segments/head/digits2.onnx"))
    m = json.loads((dst / "manifest.json").read_text())
    head = m["segments"][-1]["variants"]
    head["digits2"] = {**head["digits"], "file": "segments/head/digits2.onnx"}
    head["digits2"]["sha256"] = sha256_file(dst / "segments/head/digits2.onnx")
    m["tasks"]["digits2"] = {
        **m["tasks"]["digits"],
        "variants": {**m["tasks"]["digits"]["variants"], "head": "digits2"},
    }
    m["version"] = "2"
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_engines_share_the_sessions_of_unchanged_files(tiny_bundle, tmp_path):
    """A second engine (a reload) on a version that adds one head file reuses every other session
    and warms only the task that uses the new one; releasing the old engine keeps what the new uses."""
    import numpy as np

    from contract.bundle import load_bundle
    from service.engine import OrtEngine

    v2 = _with_new_task(tiny_bundle, tmp_path / "v2")
    pool = SessionPool()
    calls: list[list[str]] = []

    class Counting(OrtEngine):
        def infer(self, x, tasks):
            calls.append(list(tasks))
            return super().infer(x, tasks)

    bundle = load_bundle(tiny_bundle)
    old = Counting(bundle, session_pool=pool)
    old.start()
    files = len(pool)
    # 7 files (3 stems, a trunk, 3 heads), one session per distinct content: the untrained tiny
    # bundle's stems are copies of one module, so are its two 10-class heads
    distinct = {v.sha256 for s in bundle.manifest.segments for v in s.variants.values()}
    assert files == len(distinct) < 7 and old.sessions_reused == 7 - files
    calls.clear()
    new = Counting(load_bundle(v2), session_pool=pool)
    new.start()
    assert new.sessions_reused == 7 and len(pool) == files + 1  # every unchanged file reused
    for key, sess in old.sessions.items():
        assert new.sessions[key] is sess
    assert {t for c in calls for t in c} == {"digits2"}  # warm-up ran only the new task
    assert new.describe()["sessions_reused"] == 7
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    a, _ = old.infer(x, ["digits"] * 3)
    b, _ = new.infer(x, ["digits2", "digits", "animals"])
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    old.stop()
    assert len(pool) == files + 1  # the new engine holds them all
    new.stop()
    assert len(pool) == 0
