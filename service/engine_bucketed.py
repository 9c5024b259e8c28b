"""The engine's shape-stable path (service/buckets.py): every (segment, variant, bucket) has its own
preallocated input and output buffers bound once; rows are copied into the bound input (from the host
for the first segment, device to device afterwards) and the call replays the CUDA graph captured for
its bucket (``gpu_graph_id`` = 1 + the bucket's index, per session), or runs a session of its own
(one shape per session, so cuDNN never rebuilds a plan). A mixin of :class:`service.engine.OrtEngine`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from contract.manifest import SegmentSpec
from contract.plan import group_rows
from service.buckets import bucket_for, copy_runs
from service.engine_paths import reordered, tree_order
from service.engine_types import SegmentRun
from service.ort_setup import copy_model_bytes


@dataclass
class BucketCall:
    """One (segment, variant, bucket): the session that runs it, its IOBinding bound once to its own
    preallocated input and output buffers, and the run options carrying its CUDA graph id."""

    session: object
    binding: object
    run_options: object | None
    graph_id: int  # 0: no graph id (a session of its own, or CUDA graphs off)
    inp: object  # OrtValue [bucket, *input_shape], shared by the segment's variants for this bucket
    out: object  # OrtValue [bucket, *output_shape]

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding, self.run_options)


class BucketedPath:
    """Bound buffers per (segment, variant, bucket); needs the attributes OrtEngine sets."""

    def _out_shape(self, i: int, seg: SegmentSpec, vid: str) -> list[int]:
        if i < len(self._segments) - 1:
            return list(seg.output_shape)
        width = self.sessions[(seg.name, vid)].get_outputs()[0].shape[-1]
        if not isinstance(width, int):
            width = len(next(s.labels for s in self.manifest.tasks.values() if s.variants[seg.name] == vid))
        return [width]

    def _build_bucket_calls(self) -> None:
        """Preallocated buffers and one IOBinding per (segment, variant, bucket); the session runs
        a graph id per bucket, or is a session of its own per bucket (static batch axis)."""
        import onnxruntime as ort

        dev, did = self.device, self.device_id
        assert self.buckets
        for i, seg in enumerate(self._segments):
            inputs = {
                b: ort.OrtValue.ortvalue_from_shape_and_type([b, *seg.input_shape], np.float32, dev, did)
                for b in self.buckets
            }
            for vid in seg.variants:
                shared = self.sessions[(seg.name, vid)]
                iname, oname = self._io[(seg.name, vid)]
                batch_axis = shared.get_inputs()[0].shape[0]
                per_bucket = self.session_per_bucket or (
                    self.cuda_graphs and any(f.startswith(f"{seg.name}/{vid}:") for f in self.fallbacks)
                )
                for k, b in enumerate(self.buckets):
                    sess, graph = shared, self.cuda_graphs
                    if per_bucket:
                        sess, graph = self._bucket_session(seg, vid, b, batch_axis)
                    out = ort.OrtValue.ortvalue_from_shape_and_type(
                        [b, *self._out_shape(i, seg, vid)], np.float32, dev, did
                    )
                    binding = sess.io_binding()
                    binding.bind_ortvalue_input(iname, inputs[b])
                    binding.bind_ortvalue_output(oname, out)
                    gid, ro = 0, None
                    if graph:  # ids are per session; 0 is onnxruntime's default id, -1 "no graph"
                        gid = k + 1
                        ro = ort.RunOptions()
                        ro.add_run_config_entry("gpu_graph_id", str(gid))
                    self._bcalls[(seg.name, vid, b)] = BucketCall(sess, binding, ro, gid, inputs[b], out)
        copy = ort.InferenceSession(copy_model_bytes(), self._copy_options(), providers=self._providers())
        self._copier = (copy, copy.io_binding())

    def _copy_options(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        return so

    def _bucket_session(self, seg: SegmentSpec, vid: str, b: int, batch_axis) -> tuple[object, bool]:
        """A session of its own for bucket ``b`` (batch axis fixed when it is named): with CUDA
        graphs when asked and possible, else plain (one shape per session all the same)."""
        path = self.bundle.path(seg.name, vid)
        fixed = (batch_axis, b) if isinstance(batch_axis, str) else None
        key = (seg.name, vid, b)
        if self.cuda_graphs:
            try:
                sess = self._session(path, graphs=True, fixed_batch=fixed)
                self.sessions[key] = sess
                return sess, True
            except Exception as exc:
                self.fallbacks.append(f"{seg.name}/{vid}/{b}: no CUDA graph ({exc})")
        sess = self._session(path, fixed_batch=fixed)
        self.sessions[key] = sess
        return sess, False

    def _warmup_buckets(self) -> None:
        """Run every (segment, variant, bucket) on zeros: 3 runs in a row with a graph id (onnxruntime
        captures on the third run of an id; the same shape twice before it, so no cuDNN plan is
        rebuilt while capturing), once otherwise. A capture that fails falls back to a session of
        its own for that bucket."""
        for key, call in list(self._bcalls.items()):
            call.inp.update_inplace(np.zeros(call.inp.shape(), np.float32))
            runs = 3 if call.graph_id and self.device == "cuda" else 1
            try:
                for _ in range(runs):
                    call.run()
            except Exception as exc:
                if not call.graph_id:
                    raise
                seg = next(s for s in self._segments if s.name == key[0])
                self.fallbacks.append(f"{key[0]}/{key[1]}/{key[2]}: CUDA graph capture failed ({exc})")
                batch_axis = self.sessions[(key[0], key[1])].get_inputs()[0].shape[0]
                keep, self.cuda_graphs = self.cuda_graphs, False
                try:
                    sess, _ = self._bucket_session(seg, key[1], key[2], batch_axis)
                finally:
                    self.cuda_graphs = keep
                iname, oname = self._io[(key[0], key[1])]
                binding = sess.io_binding()
                binding.bind_ortvalue_input(iname, call.inp)
                binding.bind_ortvalue_output(oname, call.out)
                call = self._bcalls[key] = BucketCall(sess, binding, None, 0, call.inp, call.out)
                call.run()

    def _copy_rows(self, src, src_row: int, dst, dst_row: int, rows: int) -> None:
        """rows [src_row, src_row+rows) of ``src`` -> rows [dst_row, ...) of ``dst``, on the device."""
        assert self._copier is not None
        sess, b = self._copier
        elems = math.prod(src.shape()[1:])
        dev, did = self.device, self.device_id
        b.bind_input("x", dev, did, np.float32, [rows, elems], src.data_ptr() + src_row * elems * 4)
        b.bind_output("y", dev, did, np.float32, [rows, elems], dst.data_ptr() + dst_row * elems * 4)
        sess.run_with_iobinding(b)

    def _infer_bucketed(
        self, x: np.ndarray, tasks: Sequence[str]
    ) -> tuple[list[np.ndarray], list[SegmentRun]]:
        """Every call at a bucket size into its own bound buffers; batches larger than the largest
        bucket run as several sub-batches."""
        assert self.buckets
        top = self.buckets[-1]
        if len(tasks) <= top:
            return self._infer_bucketed_one(x, tasks)
        logits: list[np.ndarray] = []
        runs: list[SegmentRun] = []
        for start in range(0, len(tasks), top):
            part, part_runs = self._infer_bucketed_one(x[start : start + top], tasks[start : start + top])
            logits.extend(part)
            if not runs:
                runs = part_runs
            else:
                for run, more in zip(runs, part_runs, strict=True):
                    run.seconds += more.seconds
                    run.calls.extend(more.calls)
        return logits, runs

    def _infer_bucketed_one(
        self, x: np.ndarray, tasks: Sequence[str]
    ) -> tuple[list[np.ndarray], list[SegmentRun]]:
        assert self.buckets
        order = tree_order(tasks, self._task_variants, [s.name for s in self._segments])
        stasks = [tasks[r] for r in order]
        xs = reordered(x, order)
        n = len(order)
        where: list[tuple[tuple[str, str, int], int]] = []  # row -> (bucket call, row in its output)
        runs: list[SegmentRun] = []
        last = len(self._segments) - 1
        logits: list[np.ndarray] = [None] * n  # type: ignore[list-item]
        for i, seg in enumerate(self._segments):
            t0 = time.perf_counter()
            groups = group_rows([self._task_variants[t][seg.name] for t in stasks])
            calls = []
            now: list = [None] * n
            for vid, rows in groups:
                b = bucket_for(len(rows), self.buckets)
                key = (seg.name, vid, b)
                call = self._bcalls[key]
                if i == 0:
                    host = np.zeros((b, *xs.shape[1:]), np.float32)
                    host[: len(rows)] = (
                        xs[rows[0] : rows[-1] + 1] if rows[-1] - rows[0] + 1 == len(rows) else xs[rows]
                    )
                    call.inp.update_inplace(host)
                else:
                    for src, s0, d0, count in copy_runs(where, rows):
                        self._copy_rows(self._bcalls[src].out, s0, call.inp, d0, count)  # type: ignore[index]
                call.run()
                c = self._call(seg.name, vid, rows, stasks)
                c.padded = b
                calls.append(c)
                if i == last:
                    y = np.array(call.out.numpy()[: len(rows)])  # a copy: the buffer is reused
                    for j, r in enumerate(rows):
                        logits[order[r]] = y[j]
                else:
                    for j, r in enumerate(rows):
                        now[r] = (key, j)
            where = now
            runs.append(SegmentRun(seg.name, time.perf_counter() - t0, calls))
        return logits, runs
