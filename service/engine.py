"""The onnxruntime engine: one session per (segment, variant), run segment by segment.

Running a segment = group the batch's rows by the variant each row's task uses
(``models.plan.group_rows``), run each variant once on its rows, put the results back in order.
A shared segment is one call on the whole batch, whatever tasks it mixes.

CPU: ``intra_op_num_threads`` from the settings and spinning off (chained sessions otherwise
waste 28-60% of the throughput). CUDA: the CUDA execution provider with IOBinding, so the
intermediates stay on the device between segments.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from models.plan import group_rows
from service.bundle import Bundle
from service.errors import BundleError
from service.manifest import Manifest, SegmentSpec
from service.precision import check_precision

log = logging.getLogger("mtserve.engine")


@dataclass
class Call:
    """One onnxruntime call: a variant run on some rows."""

    variant: str
    rows: int
    tasks: int  # distinct tasks among those rows
    shared: bool  # the variant serves more than one task


@dataclass
class SegmentRun:
    segment: str
    seconds: float
    calls: list[Call] = field(default_factory=list)


class Engine(Protocol):
    """What the batcher needs from an engine; tests/fakes.py implements it without onnxruntime."""

    manifest: Manifest
    providers: list[str]
    ready: bool

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def infer(self, x: np.ndarray, tasks: Sequence[str]) -> tuple[list[np.ndarray], list[SegmentRun]]:
        """Logits per row (each of its task's width) and what each segment did."""
        ...


def _contiguous(rows: list[int]) -> bool:
    return rows[-1] - rows[0] + 1 == len(rows)


def _shared_variants(manifest: Manifest) -> dict[str, set[str]]:
    """segment -> variants used by more than one task."""
    out: dict[str, set[str]] = {}
    for seg in manifest.segments:
        users: dict[str, int] = {}
        for spec in manifest.tasks.values():
            vid = spec.variants[seg.name]
            users[vid] = users.get(vid, 0) + 1
        out[seg.name] = {v for v, n in users.items() if n > 1}
    return out


_shared_arena_lock = threading.Lock()
_shared_arena = False


def _register_shared_cpu_arena() -> None:
    """One CPU memory arena for every session of the process (onnxruntime's environment allocator).

    By default each session keeps its own arena, grown to its own peak and never shrunk: a bundle
    with 16 stems, a trunk and 16 heads holds 33 of them (resnet50 at 224 px: 1,157 MiB after warm-up
    at batch 1 and 8). Sessions run one at a time on the engine thread, so one arena sized by the
    largest single call serves them all (465 MiB, same throughput; ``enable_cpu_mem_arena=False``
    gave 784 MiB and lost throughput). Registered once per process; later engines (a reloaded
    bundle) share it.
    """
    global _shared_arena
    import onnxruntime as ort

    with _shared_arena_lock:
        if _shared_arena:
            return
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _shared_arena = True


class OrtEngine:
    """onnxruntime sessions for every (segment, variant) of a bundle."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        threads: int = 1,
        device_id: int = 0,
        warmup_batch_sizes: Sequence[int] = (1,),
        io_binding: bool | None = None,
        shared_cpu_arena: bool = True,
    ):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.device = device
        self.device_id = device_id
        self.threads = threads
        self.warmup_batch_sizes = tuple(warmup_batch_sizes)
        self.io_binding = (device == "cuda") if io_binding is None else io_binding
        self.shared_cpu_arena = shared_cpu_arena  # one CPU arena for all sessions (False: one each)
        self.providers: list[str] = []
        self.ready = False
        self.sessions: dict[tuple[str, str], object] = {}
        self._io: dict[tuple[str, str], tuple[str, str]] = {}
        self._shared = _shared_variants(self.manifest)
        self._segments: list[SegmentSpec] = list(self.manifest.segments)
        self._task_variants = {t: s.variants for t, s in self.manifest.tasks.items()}

    # -- life cycle -------------------------------------------------------------------------------
    def _options(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.shared_cpu_arena:
            _register_shared_cpu_arena()
            so.add_session_config_entry("session.use_env_allocators", "1")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.log_severity_level = 3
        return so

    def _providers(self) -> list:
        if self.device == "cuda":
            # HEURISTIC: cuDNN's EXHAUSTIVE default benchmarks every new input shape, and grouped
            # batches give each segment many batch sizes (measured on an H200: 10-50x slower serving)
            cuda = {"device_id": self.device_id, "cudnn_conv_algo_search": "HEURISTIC"}
            return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def start(self) -> None:
        """Create every session, check its shapes against the manifest, warm every variant up."""
        import onnxruntime as ort

        if self.device == "cuda" and hasattr(ort, "preload_dlls"):
            try:  # CUDA/cuDNN from the nvidia-* wheels when the system has none
                ort.preload_dlls()
            except Exception as exc:  # best effort: the provider check below reports the outcome
                log.warning("onnxruntime.preload_dlls failed: %s", exc)
        in_use: list[str] = []
        for i, seg in enumerate(self._segments):
            for vid in seg.variants:
                path = self.bundle.path(seg.name, vid)
                try:
                    sess = ort.InferenceSession(str(path), self._options(), providers=self._providers())
                except Exception as exc:  # onnxruntime raises its own exception types
                    raise BundleError(f"{path}: onnxruntime cannot load it ({exc})") from None
                self._check_io(sess, path, i, seg, vid)
                check_precision(seg.variants[vid], sess.get_providers(), path)  # fp16: CUDA only
                self.sessions[(seg.name, vid)] = sess
                self._io[(seg.name, vid)] = (sess.get_inputs()[0].name, sess.get_outputs()[0].name)
                provider = sess.get_providers()[0]
                if provider not in in_use:
                    in_use.append(provider)
        self.providers = in_use
        if self.device == "cuda" and "CUDAExecutionProvider" not in in_use:
            log.warning("device=cuda asked, but onnxruntime runs on %s", in_use)
        for n in self.warmup_batch_sizes:
            self._warmup(n)
        self.ready = True

    def _check_io(self, sess, path, i: int, seg: SegmentSpec, vid: str) -> None:
        (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
        for what, arg, expect in (
            ("input_shape", inp, seg.input_shape),
            ("output_shape", out, seg.output_shape),
        ):
            dims = list(arg.shape)[1:]
            ok = len(dims) == len(expect) and all(
                not isinstance(d, int) or e == -1 or d == e for d, e in zip(dims, expect, strict=True)
            )
            if not ok:
                raise BundleError(
                    f"{path}: {arg.name} has shape {list(arg.shape)}, manifest field "
                    f"segments[{i}].{what} says [N, {', '.join(map(str, expect))}]"
                )
        width = list(out.shape)[-1]
        if i == len(self._segments) - 1 and isinstance(width, int):
            for task, spec in self.manifest.tasks.items():
                if spec.variants[seg.name] == vid and len(spec.labels) != width:
                    raise BundleError(
                        f"{path}: outputs {width} classes, manifest field tasks.{task}.labels has "
                        f"{len(spec.labels)}"
                    )

    def _warmup(self, n: int) -> None:
        """Run every variant once: one batch per task, then one batch mixing every task."""
        shape = (n, *self.manifest.input.size)
        x = np.zeros(shape, dtype=np.float32)
        for task in self.manifest.tasks:
            self.infer(x, [task] * n)
        tasks = list(self.manifest.tasks)
        self.infer(np.zeros((len(tasks), *shape[1:]), np.float32), tasks)

    def stop(self) -> None:
        self.ready = False
        self.sessions.clear()

    # -- inference ----------------------------------------------------------------------------
    def infer(self, x: np.ndarray, tasks: Sequence[str]) -> tuple[list[np.ndarray], list[SegmentRun]]:
        if self.io_binding:
            return self._infer_bound(x, tasks)
        return self._infer_host(x, tasks)

    def _call(self, seg: str, vid: str, rows: list[int], tasks: Sequence[str]) -> Call:
        distinct = len({tasks[r] for r in rows})
        return Call(vid, len(rows), distinct, vid in self._shared[seg])

    def _infer_host(self, x: np.ndarray, tasks: Sequence[str]) -> tuple[list[np.ndarray], list[SegmentRun]]:
        """numpy in, numpy out, segment by segment."""
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
                y = sess.run(None, {iname: part})[0]
                calls.append(self._call(seg.name, vid, rows, tasks))
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
        # sort by the variant path from the last segment to the first: tree-shaped plans
        # (stems per task, branches per group, shared trunk) then group contiguously everywhere
        paths = [tuple(self._task_variants[t][s.name] for s in reversed(self._segments)) for t in tasks]
        order = sorted(range(len(tasks)), key=lambda r: paths[r])
        stasks = [tasks[r] for r in order]
        cur = OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x[order], dtype=np.float32), dev, did)
        n = len(order)
        runs: list[SegmentRun] = []
        last = len(self._segments) - 1
        logits: list[np.ndarray] = [None] * n  # type: ignore[list-item]
        for i, seg in enumerate(self._segments):
            t0 = time.perf_counter()
            groups = group_rows([self._task_variants[t][seg.name] for t in stasks])
            row_in = int(np.prod(cur.shape()[1:])) * 4
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
                    row_out = int(np.prod(seg.output_shape)) * 4
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
