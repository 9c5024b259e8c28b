"""Rows through shared memory (service/row_arena.py): the ring's allocation, the wire's offsets, the API
side (service/engine_client.py) and the engine side (service/engine_core.py), without processes (the
processes: tests/test_workers.py)."""

from __future__ import annotations

import asyncio
import os
import random

import numpy as np
import pytest

from contract import errors
from service import row_arena, wire
from service.row_arena import ALIGN, RowArena


def _rows(n: int, value: float) -> np.ndarray:
    return np.full((n, 3, 4, 4), value, np.float32)  # 192 bytes a row


def test_put_copies_into_aligned_blocks_the_engine_reads_as_views():
    buf = bytearray(4096)
    arena = RowArena(buf)
    a, b = _rows(1, 1.0), _rows(2, 2.0)
    at_a, at_b = arena.put(a), arena.put(b)
    assert (at_a, at_b) == (0, 192)  # 192 is a multiple of ALIGN
    assert arena.put(np.ones(5, np.float32)) == 192 + 384  # 20 bytes take a block of 64
    assert arena.put(np.ones(1, np.float32)) == 192 + 384 + ALIGN
    engine = np.frombuffer(bytes(buf), "<f4")  # what the engine maps, read-only
    got = row_arena.rows_at(engine, at_b, b.shape)
    assert np.array_equal(got, b) and np.shares_memory(got, engine)


def test_a_full_ring_refuses_until_its_oldest_block_is_freed():
    arena = RowArena(bytearray(1024))
    first = [arena.put(_rows(1, i)) for i in range(5)]  # 5 x 192 = 960 of 1024
    assert first == [0, 192, 384, 576, 768]
    assert arena.put(_rows(1, 9)) is None  # 64 left at the end, none at the start
    arena.free(192)  # not the oldest: nothing is reclaimed yet
    assert arena.put(_rows(1, 9)) is None and arena.blocks == 5
    arena.free(0)  # the oldest two: the start of the ring is free again
    assert arena.blocks == 3
    assert arena.put(_rows(2, 9)) == 0  # 384 bytes fit before the oldest live block (384)
    assert arena.put(_rows(1, 9)) is None  # wrapped: only [384, 384) between head and oldest
    for at in (384, 576, 768, 0):
        arena.free(at)
    assert arena.blocks == 0
    assert arena.put(_rows(5, 1)) == 0  # an empty ring starts over at 0
    arena.free(0)
    assert arena.put(np.zeros(257, np.float32)) is None and arena.blocks == 0  # larger than the ring


def test_the_ring_goes_round_a_span_that_grows_only_when_rows_do_not_fit():
    """Under steady load the ring writes only the pages its rows in flight need (not the whole arena):
    it wraps at its span, doubled when a request does not fit."""
    arena = RowArena(bytearray(16384), min_span=1024)
    highest, previous = 0, None
    for i in range(200):  # two requests in flight at a time, 192 bytes each
        at = arena.put(_rows(1, i))
        highest = max(highest, at + 192)
        if previous is not None:
            arena.free(previous)
        previous = at
    assert highest <= 1024 and arena.span == 1024
    arena.free(previous)
    assert arena.blocks == 0
    live = [arena.put(_rows(1, 9)) for _ in range(8)]  # 8 x 192 = 1536 bytes: past the span
    assert live == [0, 192, 384, 576, 768, 960, 1152, 1344]  # the head used the doubled span at once
    assert arena.span == 2048
    for at in live[:7]:
        arena.free(at)
    wrapped = [arena.put(_rows(2, 9)) for _ in range(5)]  # 384 bytes each: to 2048, then round
    assert wrapped == [1536, 0, 384, 768, None]  # the oldest live block is at 1344
    assert arena.span == 2048  # wrapped: the doubling waits for the head to reach the span again
    for at in [live[7], wrapped[0]]:
        arena.free(at)
    assert arena.put(_rows(8, 9)) == 1152 and arena.span == 4096  # 1536 bytes: the head took the new span
    assert arena.put(np.zeros(16384 // 4 + 1, np.float32)) is None  # larger than the arena


def test_random_puts_and_frees_never_overlap_a_live_block():
    """Blocks freed in any order: every live block keeps its bytes, inside the ring, apart from the others."""
    rng = random.Random(0)
    buf = bytearray(8192)
    arena = RowArena(buf, min_span=2048)
    live: dict[int, np.ndarray] = {}
    refused = 0
    for step in range(4000):
        if live and (rng.random() < 0.45 or len(live) > 12):
            at = rng.choice(list(live))
            x = live.pop(at)
            assert np.array_equal(np.frombuffer(buf, np.float32, x.size, at), x.ravel()), step
            arena.free(at)
            continue
        x = np.full(rng.randint(1, 400), step, np.float32)
        at = arena.put(x)
        if at is None:
            refused += 1
            continue
        assert at % ALIGN == 0 and at + x.nbytes <= len(buf)
        for other, y in live.items():
            assert at + x.nbytes <= other or other + y.nbytes <= at, (step, at, other)
        live[at] = x
    assert refused and len(live) < 4000  # the ring filled up at times and was reused


def test_rows_outside_the_arena_are_refused():
    engine = np.zeros(256, np.float32)  # 1024 bytes
    for offset, shape in ((-4, (1, 4)), (2, (1, 4)), (1020, (1, 4)), (0, (1, 257))):
        with pytest.raises(ValueError, match="outside"):
            row_arena.rows_at(engine, offset, shape)


def test_infer_by_offset_takes_its_rows_from_the_senders_arena_only():
    buf = bytearray(4096)
    arena = RowArena(buf)
    a, b = _rows(1, 1.0), _rows(2, 2.0)
    msg = wire.Infer([1, 2], ["a", "b"], [1, 1], [5.0, 5.0], [1, 2], (3, 4, 4), [arena.put(a), arena.put(b)])
    assert wire.decode_to_engine(wire.encode(msg)) == msg
    engine = np.frombuffer(bytes(buf), "<f4")
    got = wire.requests_of(msg, None, engine)
    assert np.array_equal(got[0], a) and np.array_equal(got[1], b)
    far = wire.Infer([1], ["a"], [1], [5.0], [1], (3, 4, 4), [4096 - 64])
    for bad, frame, where in (
        (msg, None, None),  # no arena for this connection
        (msg, memoryview(bytes(576)), engine),  # offsets and a frame
        (wire.Infer([1, 2], ["a", "b"], [1, 1], [5.0, 5.0], [1, 2], (3, 4, 4), [0]), None, engine),
        (far, None, engine),  # past the end
    ):
        with pytest.raises(errors.InvalidInput):
            wire.requests_of(bad, frame, where)


def test_create_maps_one_memory_in_two_processes_views():
    fd = row_arena.create(1 << 16)
    try:
        writer, reader = row_arena.map_fd(fd, writable=True), row_arena.map_fd(fd, writable=False)
        arena = RowArena(writer)
        at = arena.put(_rows(1, 7.0))
        engine = np.frombuffer(reader, "<f4")
        assert np.array_equal(row_arena.rows_at(engine, at, (1, 3, 4, 4)), _rows(1, 7.0))
        with pytest.raises(TypeError):  # the engine's mapping is read-only
            reader[0] = 1
        assert os.fstat(fd).st_size == 1 << 16
    finally:
        os.close(fd)


# -- the API process's side ------------------------------------------------------------------------
def _client(size: int, on_spill=None):
    from service.channel import Channel
    from service.engine_client import EngineClient
    from tests.test_wire import _Transport

    buf = bytearray(size)
    client = EngineClient("unused", engine_pid=1, arena=RowArena(buf), on_spill=on_spill)
    client._chan = Channel(client._on_message, client._lost)
    client._chan.connection_made(_Transport())
    return client, client._chan.transport, buf


def _sent(transport) -> list:
    from service.channel import Channel

    got: list = []
    receiver = Channel(lambda _, header, tensor: got.append((wire.decode_to_engine(header), tensor)))
    for chunk in transport.out:
        receiver.data_received(chunk)
    return got


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def _answer(client, ids: list[int], widths: int = 10) -> None:
    probs = np.zeros(len(ids) * widths, np.float32)
    msg = wire.encode(wire.Results("1", ids, [1] * len(ids), [widths] * len(ids)))
    client._on_message(client._chan, memoryview(msg), memoryview(probs.tobytes()))


async def test_rows_go_by_offset_and_those_that_do_not_fit_by_the_socket():
    spilled: list[int] = []
    client, transport, buf = _client(1024, on_spill=lambda: spilled.append(1))
    small, large = _rows(1, 1.0), _rows(6, 2.0)  # 192 bytes fit, 1152 do not
    ta = asyncio.ensure_future(client.infer("digits", small, 1, 5.0))
    tb = asyncio.ensure_future(client.infer("digits", large, 1, 5.0))
    await _turns()
    (by_offset, no_frame), (inline, frame) = _sent(transport)
    assert by_offset.ids == [1] and by_offset.offsets == [0] and no_frame is None
    assert inline.ids == [2] and inline.offsets is None
    assert np.array_equal(wire.requests_of(inline, frame)[0], large)
    engine = np.frombuffer(bytes(buf), "<f4")
    assert np.array_equal(wire.requests_of(by_offset, None, engine)[0], small)
    assert client.arena.blocks == 1 and spilled == [1]  # counted: mtserve_rows_spilled_total
    _answer(client, [1, 2])
    await ta, await tb
    assert client.arena.blocks == 0  # answered: its block is free


async def test_a_block_is_freed_when_its_request_is_given_up_or_fails():
    client, transport, _ = _client(4096)
    t1 = asyncio.ensure_future(client.infer("digits", _rows(1, 1.0), 1, 5.0))
    t2 = asyncio.ensure_future(client.infer("digits", _rows(1, 2.0), 1, 5.0))
    await _turns()
    assert client.arena.blocks == 2
    t1.cancel()  # the client left, or the deadline passed
    with pytest.raises(asyncio.CancelledError):
        await t1
    failure = wire.encode(wire.Failure(2, "QueueFull", "full"))
    client._on_message(client._chan, memoryview(failure), None)
    with pytest.raises(errors.QueueFull):
        await t2
    assert client.arena.blocks == 0
    assert [type(m).__name__ for m, _ in _sent(transport)] == ["Infer", "Cancel"]


async def test_the_engine_computes_rows_from_the_arena_its_hello_named():
    """An API process's Hello names its arena; its Infer by offset is computed on those rows and answered
    as rows sent on the socket are."""
    import time

    from tests.test_wire import bare_core, replies

    buf = bytearray(1 << 16)
    arena = RowArena(buf)
    core, batcher, chan = bare_core([np.zeros(4, "<f4"), np.frombuffer(buf, "<f4")])
    m = core.units[1].manifest
    x = np.random.default_rng(0).random((2, *m.input.size), dtype=np.float32)
    deadline = time.monotonic() + 10
    msg = wire.Infer([1, 2], ["digits", "shapes"], [1, 1], [deadline] * 2, [1, 1], m.input.size)
    msg.offsets = [arena.put(x[:1]), arena.put(x[1:])]
    core._on_message(chan, memoryview(wire.encode(msg)), None)  # before its Hello: refused
    core._on_message(chan, memoryview(wire.encode(wire.Hello(1))), None)
    core._on_message(chan, memoryview(wire.encode(msg)), None)
    inline = wire.Infer([3, 4], ["digits", "shapes"], [1, 1], [deadline] * 2, [1, 1], m.input.size)
    core._on_message(chan, memoryview(wire.encode(inline)), memoryview(x.tobytes()))
    got = await replies(chan, lambda got: len({i for r, i, _ in got if isinstance(r, wire.Results)}) == 4)
    await batcher.stop()
    failed = [(rid, r.kind) for r, rid, _ in got if isinstance(r, wire.Failure)]
    assert failed == [(1, "InvalidInput"), (2, "InvalidInput")]  # the Infer before the Hello
    out = {rid: o for r, rid, o in got if isinstance(r, wire.Results)}
    assert sorted(out) == [1, 2, 3, 4]
    assert np.array_equal(out[1], out[3]) and np.array_equal(out[2], out[4])  # same rows, same answer
    assert not np.array_equal(out[1], out[2])


def test_the_supervisor_makes_one_arena_per_api_process_or_none(monkeypatch, caplog):
    """``--rows-shm-mb``: one memfd of that size per API process; 0, or a system without memfd (or out of
    memory): none, with a warning, and the rows travel on the socket."""
    from service import supervisor
    from service.settings import Settings

    fds = supervisor.make_arenas(Settings(bundle="b", rows_shm_mb=3), 2)
    try:
        assert len(fds) == 2 and [os.fstat(fd).st_size for fd in fds] == [3 * row_arena.MIB] * 2
        assert os.readlink(f"/proc/self/fd/{fds[0]}").startswith("/memfd:mtserve-rows")
    finally:
        for fd in fds:
            os.close(fd)
    assert supervisor.make_arenas(Settings(bundle="b", rows_shm_mb=0), 2) == []
    made: list[int] = []

    def second_fails(size: int) -> int:
        if made:
            raise OSError("no memfd here")
        made.append(os.memfd_create("probe"))
        return made[-1]

    monkeypatch.setattr(supervisor.row_arena, "create", second_fails)
    assert supervisor.make_arenas(Settings(bundle="b", rows_shm_mb=3), 2) == []
    with pytest.raises(OSError):  # the one made before the failure was closed
        os.fstat(made[0])
    assert "travel on the socket" in caplog.text
