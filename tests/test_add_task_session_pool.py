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
