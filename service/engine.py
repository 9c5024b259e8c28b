"""The onnxruntime engine: one session per (segment, variant), run segment by segment.

Running a segment = group the batch's rows by the variant each row's task uses
(``contract.plan.group_rows``), run each variant once on its rows, put the results back in order.
A shared segment is one call on the whole batch, whatever tasks it mixes.

CPU: ``intra_op_num_threads`` from the settings and spinning off (chained sessions otherwise
waste 28-60% of the throughput). CUDA: the CUDA execution provider with IOBinding, so the
intermediates stay on the device between segments.

Shape-stable execution (``buckets``, service/buckets.py): every (segment, variant) call pads its
rows to a bucket size. With IOBinding (CUDA), each (segment, variant, bucket) has preallocated
input and output buffers bound once; the rows are copied into the bound input (from the host for
the first segment, device to device afterwards) and the call replays the CUDA graph captured for
that bucket (``gpu_graph_id`` = 1 + the bucket's index, per session), or runs a session of its own
(``session_per_bucket``: one shape per session, so cuDNN never rebuilds a plan). Every
(segment, variant, bucket) is created and warmed up (captured) in ``start()``, before ``ready``.
The CPU runs the same path with CPU buffers (graph ids attached and ignored by the CPU provider),
which is how the default test run checks it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from contract.bundle import Bundle
from contract.errors import BundleError
from contract.manifest import Manifest, SegmentSpec
from contract.plan import group_rows
from service.buckets import Buckets, bucket_for, chunks, copy_runs
from service.precision import check_precision

log = logging.getLogger("mtserve.engine")


@dataclass
class Call:
    """One onnxruntime call: a variant run on some rows."""

    variant: str
    rows: int
    tasks: int  # distinct tasks among those rows
    shared: bool  # the variant serves more than one task
    padded: int = 0  # rows computed, padding included (0: no padding, ``rows``)


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


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: bytes | int | str) -> bytes:
    """One protobuf field: varint for int, length-delimited for bytes/str."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def copy_model_bytes() -> bytes:
    """A one-node ONNX model ``y = Identity(x)``, x float32 ``[n, d]`` (both axes free).

    Written as protobuf by hand (the serving install has no ``onnx``). Run with IOBinding to raw
    pointers it copies ``n`` rows from one buffer to another on the device, without the host:
    how rows reach the bound input of a (segment, variant, bucket) from the previous segment.
    """

    def tensor_value(name: str) -> bytes:
        dims = _field(1, _field(2, "n")) + _field(1, _field(2, "d"))  # dim { dim_param }
        tensor = _field(1, 1) + _field(2, dims)  # elem_type FLOAT, shape
        return _field(1, name) + _field(2, _field(1, tensor))  # ValueInfo { name, type { tensor_type } }

    node = _field(1, "x") + _field(2, "y") + _field(3, "copy") + _field(4, "Identity")
    graph = (
        _field(1, node) + _field(2, "rowcopy") + _field(11, tensor_value("x")) + _field(12, tensor_value("y"))
    )
    opset = _field(1, "") + _field(2, 13)
    return _field(1, 8) + _field(7, graph) + _field(8, opset)  # ir_version 8, graph, opset_import


def _rss_bytes() -> int | None:
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


_cudart = None


def device_memory_used(device_id: int) -> int | None:
    """Bytes in use on the CUDA device (all processes: cudaMemGetInfo), None when unknown."""
    global _cudart
    if _cudart is None:
        for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"):
            try:
                _cudart = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            _cudart = False
    if not _cudart:
        return None
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if _cudart.cudaSetDevice(device_id) != 0 or _cudart.cudaMemGetInfo(
        ctypes.byref(free), ctypes.byref(total)
    ):
        return None
    return total.value - free.value


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


SessionFactory = Callable[..., object]


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
        buckets: Sequence[int] | None = None,
        cuda_graphs: bool = False,
        session_per_bucket: bool | None = None,
        session_factory: SessionFactory | None = None,
    ):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.device = device
        self.device_id = device_id
        self.threads = threads
        self.warmup_batch_sizes = tuple(warmup_batch_sizes)
        self.io_binding = (device == "cuda") if io_binding is None else io_binding
        self.shared_cpu_arena = shared_cpu_arena  # one CPU arena for all sessions (False: one each)
        self.buckets: Buckets | None = tuple(sorted(set(buckets))) if buckets else None
        # graph ids need the bound buffers of the bucketed path
        self.cuda_graphs = bool(cuda_graphs and self.buckets and self.io_binding)
        if session_per_bucket is None:  # CUDA without graphs: one shape per session (no plan rebuild)
            session_per_bucket = device == "cuda" and not self.cuda_graphs
        self.session_per_bucket = bool(session_per_bucket and self.buckets and self.io_binding)
        self._factory = session_factory
        self.providers: list[str] = []
        self.ready = False
        self.sessions: dict[tuple, object] = {}
        self._io: dict[tuple[str, str], tuple[str, str]] = {}
        self._bcalls: dict[tuple[str, str, int], BucketCall] = {}
        self._copier: tuple[object, object] | None = None
        self._shared = _shared_variants(self.manifest)
        self._segments: list[SegmentSpec] = list(self.manifest.segments)
        self._task_variants = {t: s.variants for t, s in self.manifest.tasks.items()}
        self._describe: dict = {}
        self.fallbacks: list[str] = []

    # -- life cycle -------------------------------------------------------------------------------
    def _options(self, fixed_batch: tuple[str, int] | None = None):
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
        if fixed_batch is not None:  # a static batch axis: shape nodes fold away, graphs can capture
            so.add_free_dimension_override_by_name(*fixed_batch)
        return so

    def _providers(self, graphs: bool = False) -> list:
        if self.device == "cuda":
            # shape-stable (buckets): every shape is seen at warm-up only, so cuDNN's EXHAUSTIVE
            # search runs once per (variant, bucket). Otherwise HEURISTIC: EXHAUSTIVE benchmarks
            # every new input shape, and grouped batches give each segment many batch sizes
            # (measured on an H200: 10-50x slower serving)
            search = "EXHAUSTIVE" if self.buckets and self.io_binding else "HEURISTIC"
            cuda = {"device_id": self.device_id, "cudnn_conv_algo_search": search}
            if graphs:
                cuda["enable_cuda_graph"] = "1"
            return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _session(self, path, graphs: bool = False, fixed_batch: tuple[str, int] | None = None):
        import onnxruntime as ort

        factory = self._factory or ort.InferenceSession
        return factory(str(path), self._options(fixed_batch), providers=self._providers(graphs))

    def _memory_now(self) -> int | None:
        return device_memory_used(self.device_id) if self.device == "cuda" else _rss_bytes()

    def start(self) -> None:
        """Create every session, check its shapes against the manifest, warm every variant up
        (every (variant, bucket) when bucketed: captured, with CUDA graphs)."""
        import onnxruntime as ort

        t0 = time.perf_counter()
        if self.device == "cuda" and hasattr(ort, "preload_dlls"):
            try:  # CUDA/cuDNN from the nvidia-* wheels when the system has none
                ort.preload_dlls()
            except Exception as exc:  # best effort: the provider check below reports the outcome
                log.warning("onnxruntime.preload_dlls failed: %s", exc)
        mem0 = self._memory_now()
        in_use: list[str] = []
        for i, seg in enumerate(self._segments):
            for vid in seg.variants:
                path = self.bundle.path(seg.name, vid)
                graphs = self.cuda_graphs and not self.session_per_bucket
                try:
                    sess = self._session(path, graphs=graphs)
                except Exception as exc:  # onnxruntime raises its own exception types
                    if not graphs:
                        raise BundleError(f"{path}: onnxruntime cannot load it ({exc})") from None
                    # e.g. "cannot use the graph capture feature ... not all nodes on CUDA": the
                    # dynamic batch axis leaves shape nodes on the CPU; sessions per bucket fix it
                    self.fallbacks.append(f"{seg.name}/{vid}: no CUDA graph on the dynamic model ({exc})")
                    sess = self._session(path)
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
        t1 = time.perf_counter()
        if self.buckets and self.io_binding:
            self._build_bucket_calls()
            self._warmup_buckets()
        else:
            for n in self.warmup_batch_sizes:
                self._warmup(n)
            if self.buckets:  # host path, padded: every (variant, bucket) once
                for b in self.buckets:
                    self._warmup_host_bucket(b)
        t2 = time.perf_counter()
        mem1 = self._memory_now()
        self._describe = {
            "startup_s": round(t2 - t0, 3),
            "sessions_s": round(t1 - t0, 3),
            "warmup_s": round(t2 - t1, 3),
            "memory_kind": "device" if self.device == "cuda" else "resident",
            "memory_bytes": (mem1 - mem0) if mem0 is not None and mem1 is not None else None,
        }
        self.ready = True
        d = self.describe()
        log.info(
            "engine ready in %.2f s (sessions %.2f s, warm-up %.2f s): %s, buckets %s, %d bucket calls, "
            "%d CUDA graphs, %s memory held %s MiB, bound buffers %.1f MiB",
            d["startup_s"], d["sessions_s"], d["warmup_s"], d["execution"], d["buckets"],
            d["bucket_calls"], d["cuda_graphs_captured"], d["memory_kind"],
            None if d["memory_bytes"] is None else round(d["memory_bytes"] / 2**20, 1),
            d["buffers_bytes"] / 2**20,
        )  # fmt: skip
        for line in self.fallbacks:
            log.warning("fallback: %s", line)

    def describe(self) -> dict:
        """What the engine runs and what its start-up cost: for logs, /readyz and the benches."""
        if self.buckets and self.io_binding:
            execution = "session-per-bucket" if self.session_per_bucket else "bound-buckets"
            if self.cuda_graphs:
                execution = "cuda-graphs"
        elif self.buckets:
            execution = "padded"
        else:
            execution = "io-binding" if self.io_binding else "host"
        graphs = sum(1 for c in self._bcalls.values() if c.graph_id) if self.device == "cuda" else 0
        buffers = sum(c.out.tensor_size_in_bytes() for c in self._bcalls.values()) + sum(
            v.tensor_size_in_bytes() for v in {id(c.inp): c.inp for c in self._bcalls.values()}.values()
        )
        return {
            "ready": self.ready,
            "device": self.device,
            "providers": list(self.providers),
            "execution": execution,
            "buckets": list(self.buckets) if self.buckets else None,
            "cuda_graphs": self.cuda_graphs,
            "sessions": len({id(s) for s in self.sessions.values()}),
            "bucket_calls": len(self._bcalls),
            "cuda_graphs_captured": graphs,
            "buffers_bytes": int(buffers),
            "fallbacks": list(self.fallbacks),
            **self._describe,
        }  # fmt: skip

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

    def _warmup_host_bucket(self, b: int) -> None:
        """Every (segment, variant) at bucket ``b`` on the host path: one batch of b rows per task
        runs every stem, the trunk and every head at b rows (per-task variants included)."""
        x = np.zeros((b, *self.manifest.input.size), dtype=np.float32)
        for task in self.manifest.tasks:
            self.infer(x, [task] * b)

    def stop(self) -> None:
        self.ready = False
        self._bcalls.clear()
        self._copier = None
        self.sessions.clear()

    # -- bucketed, bound buffers ------------------------------------------------------------------
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
        elems = int(np.prod(src.shape()[1:]))
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
        paths = [tuple(self._task_variants[t][s.name] for s in reversed(self._segments)) for t in tasks]
        order = sorted(range(len(tasks)), key=lambda r: paths[r])
        stasks = [tasks[r] for r in order]
        xs = np.ascontiguousarray(x[order], dtype=np.float32)
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

    # -- inference ----------------------------------------------------------------------------
    def infer(self, x: np.ndarray, tasks: Sequence[str]) -> tuple[list[np.ndarray], list[SegmentRun]]:
        if self.io_binding and self.buckets:
            return self._infer_bucketed(x, tasks)
        if self.io_binding:
            return self._infer_bound(x, tasks)
        return self._infer_host(x, tasks)

    def _call(self, seg: str, vid: str, rows: list[int], tasks: Sequence[str]) -> Call:
        distinct = len({tasks[r] for r in rows})
        return Call(vid, len(rows), distinct, vid in self._shared[seg])

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
