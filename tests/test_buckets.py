"""Batch buckets (issue 13): the pure bucket functions, and the engine's bucketed paths on the CPU.

The CPU runs the CUDA path's logic (bound buffers per (segment, variant, bucket), graph ids per
bucket, sessions per bucket, device-side row copies) with CPU buffers, so its correctness is
checked here in the default run; tests/test_gpu.py repeats the checks on CUDA with real graphs.
A recording session proves that every graph id (and every per-bucket session) only ever sees its
own shape at its own address: onnxruntime does not check it, a mismatch replays the wrong graph.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from contract.bundle import load_bundle
from service.buckets import (
    bucket_for,
    check_spec,
    chunks,
    copy_runs,
    default_buckets,
    padded_rows,
    parse_buckets,
    resolve,
)

TOL = 1e-5
MIXED = ["digits", "animals", "digits", "shapes", "animals", "shapes", "digits"]


# -- pure functions ------------------------------------------------------------------------------
def test_default_buckets_are_powers_of_two_up_to_the_max():
    assert default_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert default_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert default_buckets(1) == (1,)
    with pytest.raises(ValueError):
        default_buckets(0)


def test_parse_buckets_sorts_dedups_and_names_the_bad_item():
    assert parse_buckets("8, 1,2,2,4") == (1, 2, 4, 8)
    for bad, msg in (("1,x", "'x'"), ("0,2", ">= 1"), (" , ", "no batch bucket")):
        with pytest.raises(ValueError, match=msg):
            parse_buckets(bad)


def test_spec_resolves_per_device():
    assert check_spec(" AUTO ") == "auto" and check_spec("4,2") == "2,4"
    assert resolve("auto", 32, "cuda") == (1, 2, 4, 8, 16, 32)
    assert resolve("auto", 32, "cpu") is None  # the CPU default: padding off (measured slower)
    assert resolve("pow2", 8, "cpu") == (1, 2, 4, 8)
    assert resolve("off", 32, "cuda") is None
    assert resolve("1,3,9", 32, "cpu") == (1, 3, 9)


def test_bucket_for_is_the_smallest_that_holds_the_rows():
    b = (1, 2, 4, 8)
    assert [bucket_for(n, b) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_for(9, b)
    with pytest.raises(ValueError):
        bucket_for(0, b)


@pytest.mark.parametrize("rows", [0, 1, 5, 32, 33, 70, 100])
def test_chunks_cover_every_row_once_each_within_its_bucket(rows):
    b = (1, 2, 4, 8, 16, 32)
    parts = chunks(rows, b)
    covered = [r for start, count, _ in parts for r in range(start, start + count)]
    assert covered == list(range(rows))
    assert all(count <= bucket and bucket in b for _, count, bucket in parts)
    assert padded_rows(rows, b) == sum(bucket for *_, bucket in parts)
    assert padded_rows(rows, None) == rows
    if rows == 70:
        assert parts == [(0, 32, 32), (32, 32, 32), (64, 6, 8)]


def test_copy_runs_merge_consecutive_rows_of_one_source():
    where = [("a", 0), ("a", 1), ("b", 0), ("a", 2), ("b", 1), ("b", 2)]
    assert copy_runs(where, [0, 1, 3]) == [("a", 0, 0, 3)]
    assert copy_runs(where, [2, 4, 5]) == [("b", 0, 0, 3)]
    assert copy_runs(where, [0, 2, 1]) == [("a", 0, 0, 1), ("b", 0, 1, 1), ("a", 1, 2, 1)]
    assert copy_runs(where, []) == []


# -- the engine on the real tiny bundle ----------------------------------------------------------
class RecordingBinding:
    """An IOBinding that remembers the input value it was bound to."""

    def __init__(self, inner):
        self.inner = inner
        self.input = None

    def bind_ortvalue_input(self, name, value):
        self.input = value
        self.inner.bind_ortvalue_input(name, value)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Recorder:
    """A session factory whose sessions record, per (session, graph id), every input shape and
    address they run on (IOBinding) and every batch size they get (plain ``run``)."""

    def __init__(self):
        self.bound: dict[tuple[int, int], set] = defaultdict(set)
        self.plain: dict[int, set] = defaultdict(set)
        self.names: dict[int, str] = {}

    def __call__(self, path, options, providers):
        import onnxruntime as ort

        return RecordingSession(ort.InferenceSession(path, options, providers=providers), self, path)


class RecordingSession:
    def __init__(self, inner, recorder: Recorder, path: str):
        self.inner, self.recorder = inner, recorder
        recorder.names[id(self)] = path

    def io_binding(self):
        return RecordingBinding(self.inner.io_binding())

    def run_with_iobinding(self, binding, run_options=None):
        gid = int(run_options.get_run_config_entry("gpu_graph_id")) if run_options is not None else 0
        value = binding.input
        self.recorder.bound[(id(self), gid)].add((tuple(value.shape()), value.data_ptr()))
        self.inner.run_with_iobinding(binding.inner, run_options)

    def run(self, outputs, feeds):
        (x,) = feeds.values()
        self.recorder.plain[id(self)].add(x.shape[0])
        return self.inner.run(outputs, feeds)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _engine(bundle, **kw):
    from service.engine import OrtEngine

    e = OrtEngine(load_bundle(bundle), threads=1, warmup_batch_sizes=(), **kw)
    e.start()
    return e


@pytest.fixture(scope="module")
def plain(tiny_bundle):
    e = _engine(tiny_bundle)
    yield e
    e.stop()


def _batches():
    rng = np.random.default_rng(7)
    for tasks in (MIXED, ["animals"] * 5, ["shapes"], MIXED * 3, ["digits", "shapes"] * 9):
        yield rng.normal(size=(len(tasks), 3, 32, 32)).astype(np.float32), tasks


def _same(a, b) -> float:
    return max(float(np.abs(p - q).max()) for p, q in zip(a, b, strict=True))


PATHS = {
    "host-padded": dict(buckets=(1, 2, 4, 8, 16, 32)),
    "bound-buckets": dict(buckets=(1, 2, 4, 8), io_binding=True),  # 21 and 27 rows: sub-batches
    "graph-ids": dict(buckets=(1, 2, 4, 8, 16, 32), io_binding=True, cuda_graphs=True),
    "session-per-bucket": dict(buckets=(1, 3, 8, 32), io_binding=True, session_per_bucket=True),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_bucketed_paths_equal_the_unpadded_engine(tiny_bundle, plain, path):
    e = _engine(tiny_bundle, **PATHS[path])
    try:
        for x, tasks in _batches():
            want, _ = plain.infer(x, tasks)
            got, runs = e.infer(x, tasks)
            assert _same(want, got) <= TOL, (path, tasks)
            assert [g.shape for g in got] == [w.shape for w in want]  # padded rows never returned
            for run in runs:
                assert all(c.padded in e.buckets for c in run.calls), run
                assert sum(c.rows for c in run.calls) == len(tasks)
    finally:
        e.stop()


def test_rows_sorted_by_row_order_are_computed_in_place_and_answer_as_any_order(tiny_bundle, plain):
    """A batch sorted by the engine's ``row_order`` (as the batcher hands it) is already in tree order:
    the device paths take the rows as they are (no gathered copy of the batch); any other order is
    gathered; either way every row gets its own answer."""
    from service.engine_paths import reordered, tree_order

    names = [s.name for s in plain.manifest.segments]
    tasks = sorted(MIXED * 3, key=plain.row_order.__getitem__)
    assert tree_order(tasks, plain._task_variants, names) == list(range(len(tasks)))
    x = np.random.default_rng(5).normal(size=(len(tasks), 3, 32, 32)).astype(np.float32)
    assert np.shares_memory(reordered(x, list(range(len(tasks)))), x)
    shuffled = [2, 0, 1, *range(3, len(tasks))]
    assert not np.shares_memory(got := reordered(x, shuffled), x) and np.array_equal(got, x[shuffled])
    want, _ = plain.infer(x[shuffled], [tasks[r] for r in shuffled])
    x.setflags(write=False)  # as the engine process maps the API processes' rows
    for kw in (PATHS["bound-buckets"], dict(io_binding=True)):
        e = _engine(tiny_bundle, **kw)
        try:
            got_sorted, _ = e.infer(x, tasks)
            assert _same([want[shuffled.index(r)] for r in range(len(tasks))], got_sorted) <= TOL, kw
        finally:
            e.stop()


def test_padded_call_equals_unpadded_call_for_stems_trunk_and_heads(tiny_bundle, plain):
    """Segment by segment: a variant run on k rows padded to its bucket gives the k rows' outputs."""
    rng = np.random.default_rng(3)
    seen = set()
    for (seg, vid), sess in plain.sessions.items():
        spec = next(s for s in plain.manifest.segments if s.name == seg)
        iname = sess.get_inputs()[0].name
        for k, bucket in ((1, 1), (3, 4), (5, 8), (9, 16)):
            x = rng.normal(size=(k, *spec.input_shape)).astype(np.float32)
            pad = np.concatenate([x, np.zeros((bucket - k, *spec.input_shape), np.float32)])
            (want,) = sess.run(None, {iname: x})
            (got,) = sess.run(None, {iname: pad})
            assert np.abs(got[:k] - want).max() <= TOL, (seg, vid, k)
        seen.add(seg)
    assert seen == {"stem", "trunk", "head"}


def test_each_graph_id_only_ever_sees_its_own_shape_and_address(tiny_bundle):
    rec = Recorder()
    buckets = (1, 2, 4, 8)
    e = _engine(tiny_bundle, buckets=buckets, io_binding=True, cuda_graphs=True, session_factory=rec)
    try:
        for x, tasks in _batches():
            e.infer(x, tasks)
        assert rec.bound, "no bound run recorded"
        per_session: dict[int, dict[int, int]] = defaultdict(dict)
        for (sess, gid), seen in rec.bound.items():
            assert len(seen) == 1, (rec.names[sess], gid, seen)  # one shape, one address
            ((shape, _),) = seen
            assert gid == buckets.index(shape[0]) + 1  # ids 1..n by bucket, never 0
            per_session[sess][gid] = shape[0]
        # every (segment, variant) session ran every bucket (warm-up), each under its own id
        assert len(per_session) == len(e.sessions)
        assert all(sorted(ids.values()) == list(buckets) for ids in per_session.values())
    finally:
        e.stop()


def test_each_bucket_session_only_ever_sees_its_own_shape(tiny_bundle):
    rec = Recorder()
    buckets = (1, 4, 16)
    e = _engine(tiny_bundle, buckets=buckets, io_binding=True, session_per_bucket=True, session_factory=rec)
    try:
        for x, tasks in _batches():
            e.infer(x, tasks)
        runners = {s for s, _ in rec.bound}
        variants = sum(len(s.variants) for s in e.manifest.segments)
        assert len(runners) == variants * len(buckets)  # one session per (variant, bucket)
        for (sess, gid), seen in rec.bound.items():
            assert gid == 0 and len(seen) == 1, (rec.names[sess], seen)
    finally:
        e.stop()


def test_host_padded_sessions_only_get_bucket_sizes(tiny_bundle):
    rec = Recorder()
    buckets = (1, 2, 4, 8)
    e = _engine(tiny_bundle, buckets=buckets, session_factory=rec)
    try:
        for x, tasks in _batches():
            e.infer(x, tasks)
        assert rec.plain and all(sizes <= set(buckets) for sizes in rec.plain.values())
    finally:
        e.stop()


def test_start_up_warms_every_variant_bucket_and_describes_it(tiny_bundle):
    from service.engine import OrtEngine

    rec = Recorder()
    buckets = (1, 2, 4)
    e = OrtEngine(
        load_bundle(tiny_bundle),
        threads=1,
        warmup_batch_sizes=(),
        buckets=buckets,
        io_binding=True,
        cuda_graphs=True,
        session_factory=rec,
    )
    assert not e.ready and e.describe()["ready"] is False
    e.start()
    try:
        variants = sum(len(s.variants) for s in e.manifest.segments)
        assert len(rec.bound) == variants * len(buckets)  # before any request: all warmed
        d = e.describe()
        assert d["ready"] and d["buckets"] == list(buckets) and d["execution"] == "cuda-graphs"
        assert d["bucket_calls"] == variants * len(buckets)
        assert d["cuda_graphs_captured"] == 0  # graph ids on the CPU are attached, never captured
        assert d["startup_s"] >= d["warmup_s"] >= 0 and d["memory_kind"] == "resident"
        assert d["buffers_bytes"] > 0 and d["fallbacks"] == []
    finally:
        e.stop()


def test_copy_model_copies_rows_between_buffers():
    import onnxruntime as ort

    from service.ort_setup import copy_model_bytes

    sess = ort.InferenceSession(copy_model_bytes(), providers=["CPUExecutionProvider"])
    src = np.arange(24, dtype=np.float32).reshape(4, 6)
    (out,) = sess.run(None, {"x": src})
    assert np.array_equal(out, src)
