"""The engine's unbucketed paths: host (numpy in and out, each call padded to a bucket when the CPU is
bucketed) and bound (CUDA IOBinding, intermediates stay on the device). A mixin of
:class:`service.engine.OrtEngine`."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np

from contract.plan import group_rows
from service.buckets import chunks
from service.engine_types import SegmentRun


def _contiguous(rows: list[int]) -> bool:
    return rows[-1] - rows[0] + 1 == len(rows)


def tree_order(
    tasks: Sequence[str], variants: Mapping[str, Mapping[str, str]], segments: Sequence[str]
) -> list[int]:
    """Rows sorted by their variant path from the last segment to the first: tree-shaped plans
    (stems per task, branches per group, shared trunk) then group contiguously in every segment."""
    paths = [tuple(variants[t][s] for s in reversed(segments)) for t in tasks]
    return sorted(range(len(tasks)), key=lambda r: paths[r])


def reordered(x: np.ndarray, order: list[int]) -> np.ndarray:
    """``x``'s rows in ``order``, float32 C-contiguous: ``x`` itself where the order is already the
    identity (the batcher hands the rows sorted so, by :attr:`OrtEngine.row_order`), else a copy."""
    if all(r == i for i, r in enumerate(order)):
        return np.ascontiguousarray(x, dtype=np.float32)
    return np.ascontiguousarray(x[order], dtype=np.float32)


class DirectPaths:
    """Host and bound execution; needs the attributes OrtEngine sets."""

    def _run_padded(self, sess, iname: str, part: np.ndarray) -> tuple[np.ndarray, int]:
        """Run ``part`` padded to its buckets (chunks of the largest when bigger); (output, rows computed)."""
        if not self.buckets:
            return sess.run(None, {iname: part})[0], 0
        outs, computed = [], 0
        for start, count, b in chunks(part.shape[0], self.buckets):
            piece = part[start : start + count]
            if count < b:
                piece = np.concatenate([piece, np.zeros((b - count, *piece.shape[1:]), piece.dtype)])
            outs.append(sess.run(None, {iname: piece})[0][:count])
            computed += b
        return (outs[0] if len(outs) == 1 else np.concatenate(outs)), computed

    def _infer_host(self, x: np.ndarray, tasks: Sequence[str]) -> tuple[list[np.ndarray], list[SegmentRun]]:
        """numpy in, numpy out, segment by segment (each call padded to a bucket when bucketed)."""
        cur = np.ascontiguousarray(x, dtype=np.float32)
        n = cur.shape[0]
        runs: list[SegmentRun] = []
        last = len(self._segments) - 1
        logits: list[np.ndarray] = [None] * n  # type: ignore[list-item]
        for i, seg in enumerate(self._segments):
            t0 = time.perf_counter()
            groups = group_rows([self._task_variants[t][seg.name] for t in tasks])
            calls = []
            out = None
            for vid, rows in groups:
                sess = self.sessions[(seg.name, vid)]
                iname, _ = self._io[(seg.name, vid)]
                if len(groups) == 1:
                    part = cur
                elif _contiguous(rows):
                    part = cur[rows[0] : rows[-1] + 1]
                else:
                    part = cur[np.asarray(rows)]
                y, computed = self._run_padded(sess, iname, part)
                c = self._call(seg.name, vid, rows, tasks)
                c.padded = computed
                calls.append(c)
                if i == last:
                    for j, r in enumerate(rows):
                        logits[r] = y[j]
                elif len(groups) == 1:
                    out = y
                else:
                    if out is None:
                        out = np.empty((n, *y.shape[1:]), dtype=y.dtype)
                    out[np.asarray(rows)] = y
            runs.append(SegmentRun(seg.name, time.perf_counter() - t0, calls))
            cur = out
        return logits, runs

    def _infer_bound(self, x: np.ndarray, tasks: Sequence[str]) -> tuple[list[np.ndarray], list[SegmentRun]]:
        """IOBinding: rows sorted so every group is a contiguous slice of one device buffer.

        Each variant reads its slice of the previous segment's output and writes its slice of
        this segment's output, by pointer; nothing goes back to the host until the head.
        """
        from onnxruntime import OrtValue

        dev, did = self.device, self.device_id
        order = tree_order(tasks, self._task_variants, [s.name for s in self._segments])
        stasks = [tasks[r] for r in order]
        cur = OrtValue.ortvalue_from_numpy(reordered(x, order), dev, did)
        n = len(order)
        runs: list[SegmentRun] = []
        last = len(self._segments) - 1
        logits: list[np.ndarray] = [None] * n  # type: ignore[list-item]
        for i, seg in enumerate(self._segments):
            t0 = time.perf_counter()
            groups = group_rows([self._task_variants[t][seg.name] for t in stasks])
            row_in = math.prod(cur.shape()[1:]) * 4
            out = None
            if i < last and len(groups) > 1:
                out = OrtValue.ortvalue_from_shape_and_type([n, *seg.output_shape], np.float32, dev, did)
            calls = []
            for vid, rows in groups:
                if not _contiguous(rows):  # not tree-shaped: gather on the host
                    host = cur.numpy()[np.asarray(rows)]
                    part_ptr, part = None, OrtValue.ortvalue_from_numpy(host, dev, did)
                else:
                    part_ptr, part = cur.data_ptr() + rows[0] * row_in, None
                sess = self.sessions[(seg.name, vid)]
                iname, oname = self._io[(seg.name, vid)]
                b = sess.io_binding()
                if part is None:
                    b.bind_input(iname, dev, did, np.float32, [len(rows), *cur.shape()[1:]], part_ptr)
                else:
                    b.bind_ortvalue_input(iname, part)
                if out is not None and _contiguous(rows):
                    row_out = math.prod(seg.output_shape) * 4
                    ptr = out.data_ptr() + rows[0] * row_out
                    b.bind_output(oname, dev, did, np.float32, [len(rows), *seg.output_shape], ptr)
                else:
                    b.bind_output(oname, dev if i < last else "cpu", did if i < last else 0)
                sess.run_with_iobinding(b)
                calls.append(self._call(seg.name, vid, rows, stasks))
                if i == last:
                    y = b.get_outputs()[0].numpy()
                    for j, r in enumerate(rows):
                        logits[order[r]] = y[j]
                elif out is None:
                    out = b.get_outputs()[0]
                elif not _contiguous(rows):
                    full = out.numpy()
                    full[np.asarray(rows)] = b.get_outputs()[0].numpy()
                    out = OrtValue.ortvalue_from_numpy(full, dev, did)
            runs.append(SegmentRun(seg.name, time.perf_counter() - t0, calls))
            cur = out
        return logits, runs
