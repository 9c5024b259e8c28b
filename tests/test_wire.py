"""The wire between API processes and the engine process (service/wire.py) and the engine's status
block (service/engine_status.py), without processes."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np
import pytest

from contract import errors
from service import wire
from service.engine_status import GEN, QUEUE_SIZE, QUEUED, StatusBlock


def test_messages_round_trip_as_msgpack_without_pickle():
    for msg in (
        wire.Infer([7, 9], ["digits", "shapes"], [3, 3], [12.5, 13.0], [2, 1], (3, 32, 32)),
        wire.Infer([7], ["digits"], [3], [12.5], [1], (3, 32, 32), [4096]),  # rows in the arena
        wire.Hello(2),
        wire.Cancel(7),
        wire.Call(8, "reload", "v2"),
        wire.Call(9, "reload"),
    ):
        data = wire.encode(msg)
        assert b"pickle" not in data and data[:1] != b"\x80"  # msgpack, not a pickle stream
        assert wire.decode_to_engine(data) == msg
    for msg in (
        wire.Results("1", [7, 9], [2, 1], [10, 4]),
        wire.Failure(7, "QueueFull", "full"),
        wire.Reply(8, {"a": 1}),
    ):
        assert wire.decode_to_api(wire.encode(msg)) == msg
    with pytest.raises(msgspec.ValidationError):  # an engine message is not an API message
        wire.decode_to_api(wire.encode(wire.Cancel(1)))


def test_tensor_frames_are_views():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    frame = wire.tensor_frame(x)
    assert frame.obj is x or np.shares_memory(np.frombuffer(frame, np.float32), x)  # no copy
    msg = wire.Infer([1, 2], ["a", "b"], [1, 1], [5.0, 5.0], [1, 1], (3, 4, 4))
    received = bytes(frame)
    a, b = wire.requests_of(msg, received)
    assert np.array_equal(a, x[:1]) and np.array_equal(b, x[1:])
    assert np.shares_memory(a, np.frombuffer(received, np.float32))  # views of the bytes received
    for bad in (
        wire.Infer([1, 2], ["a", "b"], [1, 1], [5.0, 5.0], [1, 2], (3, 4, 4)),  # 3 rows, 2 sent
        wire.Infer([1, 2], ["a"], [1, 1], [5.0, 5.0], [1, 1], (3, 4, 4)),  # lists of different lengths
        wire.Infer([1, 2], ["a", "b"], [1, 1], [5.0, 5.0], [2, 0], (3, 4, 4)),  # an empty request
    ):
        with pytest.raises(errors.InvalidInput):
            wire.requests_of(bad, received)


def test_results_are_cut_by_rows_and_widths():
    p = np.arange(2 * 10 + 3 * 4, dtype=np.float32)
    msg = wire.Results("1", [7, 9], [2, 3], [10, 4])
    a, b = wire.results_of(msg, p.tobytes())
    assert a.shape == (2, 10) and b.shape == (3, 4)
    assert np.array_equal(a.ravel(), p[:20]) and np.array_equal(b.ravel(), p[20:])
    with pytest.raises(errors.InvalidInput):
        wire.results_of(wire.Results("1", [7], [2], [10]), p.tobytes())


@pytest.mark.parametrize(
    "exc",
    [
        errors.QueueFull("full"),
        errors.DeadlineExceeded("late"),
        errors.NotReady("loading"),
        errors.ClientClosed("gone"),
        errors.UnknownTask("nope"),
        errors.Conflict("busy"),
        errors.IncompatibleBundle("labels"),
        errors.Forbidden("outside"),
        errors.BundleError("bad sha256"),
    ],
)
def test_errors_cross_the_wire_as_their_type(exc):
    back = wire.error_of(wire.decode_to_api(wire.encode(wire.failure_of(3, exc))))
    assert type(back) is type(exc) and str(back) == str(exc)
    if isinstance(exc, errors.QueueFull):
        assert back.headers == {"Retry-After": "1"}


def test_unknown_errors_are_internal():
    back = wire.error_of(wire.failure_of(1, KeyError("x")))
    assert isinstance(back, RuntimeError) and not isinstance(back, errors.ServiceError)


def test_status_block_shared_between_mappings(tmp_path):
    engine = StatusBlock(tmp_path / "status", create=True, n_api=2)
    api = StatusBlock(tmp_path / "status")
    assert api.info() == {} and api.api_count() == 2
    engine.ints[QUEUED], engine.ints[QUEUE_SIZE] = 5, 64
    assert api.room() == (5, 64)
    engine.publish({"gen": 1, "path": "/m/v1"})
    engine.ints[GEN] = 1
    assert api.info() == {"gen": 1, "path": "/m/v1"}
    engine.publish({"gen": 2, "path": "/m/v2", "status": {"providers": ["CPUExecutionProvider"]}})
    assert api.info()["path"] == "/m/v2"
    api.set_api_gen(1, 2)
    api.set_api_pid(0, 1234)
    assert engine.api_gen(1) == 2 and engine.api_pids() == [1234, 0]
    api.close()
    engine.close()


class _Transport:
    def __init__(self):
        self.out: list[bytes] = []
        self.closed = False

    def writelines(self, parts) -> None:
        self.out.append(b"".join(bytes(p) for p in parts))

    def close(self) -> None:
        self.closed = True


async def test_channel_frames_messages_however_they_are_split():
    from service.channel import Channel

    sender = Channel(lambda *a: None)
    sender.connection_made(_Transport())
    x = np.arange(3 * 4 * 4, dtype=np.float32).reshape(1, 3, 4, 4)
    one = wire.Infer([1], ["digits"], [1], [5.0], [1], (3, 4, 4))
    two = wire.Infer([2, 3], ["shapes", "digits"], [1, 1], [5.0, 5.0], [1, 1], (3, 4, 4))
    sender.send(wire.encode(one), wire.tensor_frame(x))
    sender.send(wire.encode(wire.Cancel(1)))
    sender.send(wire.encode(two), [wire.tensor_frame(x * 2), wire.tensor_frame(x * 3)])  # one frame, 2 parts
    assert sender.transport.out == []  # written at the end of this turn of the loop, in one write
    await asyncio.sleep(0)
    assert len(sender.transport.out) == 1
    stream = sender.transport.out[0]
    for split in (1, 7, 8, 9, 100, len(stream)):  # every way of cutting the stream into reads
        got: list = []

        def on_message(chan, header, tensor, got=got):
            msg = wire.decode_to_engine(header)
            rows = None if tensor is None else [r.copy() for r in wire.requests_of(msg, tensor)]
            got.append((msg, rows))

        receiver = Channel(on_message)
        for i in range(0, len(stream), split):
            receiver.data_received(stream[i : i + split])
        assert [m for m, _ in got] == [one, wire.Cancel(1), two] and got[1][1] is None, split
        assert np.array_equal(got[0][1][0], x), split
        assert np.array_equal(got[2][1][0], x * 2) and np.array_equal(got[2][1][1], x * 3), split


def _client():
    from service.channel import Channel
    from service.engine_client import EngineClient

    client = EngineClient("unused", engine_pid=1)
    client._chan = Channel(client._on_message, client._lost)
    client._chan.connection_made(_Transport())
    return client, client._chan.transport


def _sent(transport) -> list:
    """The messages written so far, decoded (with their tensors' rows)."""
    from service.channel import Channel

    got: list = []

    def on_message(chan, header, tensor):
        msg = wire.decode_to_engine(header)
        got.append((msg, [r.copy() for r in wire.requests_of(msg, tensor)] if tensor is not None else None))

    receiver = Channel(on_message)
    for chunk in transport.out:
        receiver.data_received(chunk)
    return got


async def test_the_requests_of_one_turn_travel_in_one_message_and_their_answers_in_one():
    client, transport = _client()
    a = np.full((1, 3, 4, 4), 1.0, np.float32)
    b = np.full((2, 3, 4, 4), 2.0, np.float32)
    ta = asyncio.ensure_future(client.infer("digits", a, 1, 5.0))
    tb = asyncio.ensure_future(client.infer("shapes", b, 1, 6.0))
    await _turns()
    [(msg, rows)] = _sent(transport)  # one message, one write
    assert len(transport.out) == 1
    assert (msg.ids, msg.tasks, msg.gens, msg.deadlines, msg.rows) == (
        [1, 2],
        ["digits", "shapes"],
        [1, 1],
        [5.0, 6.0],
        [1, 2],
    )
    assert np.array_equal(rows[0], a) and np.array_equal(rows[1], b)
    probs = np.arange(1 * 10 + 2 * 4, dtype=np.float32)
    answer = wire.encode(wire.Results("7", [2, 1], [2, 1], [4, 10]))
    client._on_message(
        client._chan, memoryview(answer), memoryview(probs[10:].tobytes() + probs[:10].tobytes())
    )
    (va, pa), (vb, pb) = await ta, await tb
    assert va == vb == "7"
    assert np.array_equal(pa, probs[:10].reshape(1, 10)) and np.array_equal(pb, probs[10:].reshape(2, 4))
    assert client.pending == {}


async def test_a_request_given_up_before_its_turn_ends_is_never_sent():
    client, transport = _client()
    x = np.zeros((1, 3, 4, 4), np.float32)
    coro = client.infer("digits", x, 1, 5.0)
    coro.send(None)  # queued for this turn's message, waiting for its answer
    with pytest.raises(asyncio.CancelledError):  # the outer layer's 504 or a client that left
        coro.throw(asyncio.CancelledError())
    await _turns()
    assert transport.out == [] and client.pending == {}  # no Infer, and no Cancel for it


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _sent_request(client) -> asyncio.Future:
    """One request of one row, its turn of the loop over (its Infer written)."""
    task = asyncio.ensure_future(client.infer("digits", np.zeros((1, 3, 4, 4), np.float32), 1, 5.0))
    await _turns()
    return task


async def test_a_request_given_up_after_it_was_sent_is_cancelled_at_the_engine():
    client, transport = _client()
    task = await _sent_request(client)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _turns()
    assert [m for m, _ in _sent(transport)] == [
        wire.Infer([1], ["digits"], [1], [5.0], [1], (3, 4, 4)),
        wire.Cancel(1),
    ]


async def test_answers_that_do_not_add_up_fail_their_requests_instead_of_hanging():
    client, _ = _client()
    task = await _sent_request(client)
    bad = wire.encode(wire.Results("7", [1], [1], [10]))
    client._on_message(client._chan, memoryview(bad), memoryview(np.zeros(3, np.float32).tobytes()))
    with pytest.raises(RuntimeError, match="engine"):
        await task


def bare_core(arenas: list[np.ndarray] | None = None):
    """(an EngineCore's message handling alone, no engine process: one version "7" of a fake manifest
    on a started Batcher over a FakeEngine; its batcher; a connection that records what it writes)."""
    from types import SimpleNamespace

    from service.batcher import Batcher
    from service.channel import Channel
    from service.engine_core import EngineCore
    from tests.fakes import FakeEngine, fake_manifest

    m = fake_manifest()
    batcher = Batcher(FakeEngine(m), list(m.tasks), max_batch_size=8, max_wait_ms=0)
    batcher.start()
    core = EngineCore.__new__(EngineCore)
    core.units = {1: SimpleNamespace(manifest=m, task=m.task, version="7", batcher=batcher)}
    core.gen, core.waiting, core._outbox = 1, {}, {}
    core.arenas, core.arena_of = arenas or [], {}
    chan = Channel(lambda *a: None)
    chan.connection_made(_Transport())
    return core, batcher, chan


async def replies(chan, enough) -> list[tuple[object, int, np.ndarray | None]]:
    """What the engine wrote to ``chan``, as (reply, request id, its probabilities or None), read until
    ``enough(replies)`` (at most a second)."""
    from service.channel import Channel

    got: list = []

    def on_message(_, header, tensor):
        reply = wire.decode_to_api(header)
        if isinstance(reply, wire.Results):
            outs = wire.results_of(reply, tensor)
            got.extend((reply, rid, out) for rid, out in zip(reply.ids, outs, strict=True))
        else:
            got.append((reply, reply.id, None))

    receiver, seen = Channel(on_message), 0
    for _ in range(500):
        await asyncio.sleep(0.002)
        for chunk in chan.transport.out[seen:]:
            receiver.data_received(chunk)
        seen = len(chan.transport.out)
        if enough(got):
            break
    return got


async def test_the_engine_answers_a_bulk_message_request_by_request():
    """One Infer with four requests: the two it can serve come back together in one Results (their own
    rows), an unknown task and an unserved generation each get their own Failure."""
    import time

    core, batcher, chan = bare_core()
    m = core.units[1].manifest
    x = np.random.default_rng(0).random((4, *m.input.size), dtype=np.float32)
    deadline = time.monotonic() + 10
    msg = wire.Infer(
        [1, 2, 3, 4],
        ["digits", "nope", "shapes", "digits"],
        [1, 1, 2, 1],
        [deadline] * 4,
        [1] * 4,
        m.input.size,
    )
    core._infer(chan, msg, memoryview(x.tobytes()))
    got = await replies(chan, lambda got: any(isinstance(r, wire.Results) for r, _, _ in got))
    await batcher.stop()
    failures = {rid: r.kind for r, rid, _ in got if isinstance(r, wire.Failure)}
    assert failures == {2: "UnknownTask", 3: "NotReady"}
    [results] = {id(r): r for r, _, _ in got if isinstance(r, wire.Results)}.values()
    outs = [o for r, _, o in got if r is results]
    assert (results.version, results.ids, results.rows, results.widths) == ("7", [1, 4], [1, 1], [10, 10])
    assert all(np.isclose(o.sum(), 1.0) for o in outs) and not np.allclose(outs[0], outs[1])
    assert core.waiting == {}
