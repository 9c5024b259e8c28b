"""The onnxruntime engine: one session per (segment, variant), run segment by segment.

Running a segment = group the batch's rows by the variant each row's task uses
(``contract.plan.group_rows``), run each variant once on its rows, put the results back in order.
A shared segment is one call on the whole batch, whatever tasks it mixes.

CPU: ``intra_op_num_threads`` from the settings and spinning off (chained sessions otherwise
waste 28-60% of the throughput). CUDA: the CUDA execution provider with IOBinding, so the
intermediates stay on the device between segments.

Shape-stable execution (``buckets``, service/buckets.py; the bound path in service/engine_bucketed.py,
the host and IOBinding paths in service/engine_paths.py): every (segment, variant) call pads its
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

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from contract.bundle import Bundle
from contract.errors import BundleError
from contract.manifest import Manifest, SegmentSpec
from service.buckets import Buckets
from service.engine_bucketed import BucketCall, BucketedPath
from service.engine_paths import DirectPaths, tree_order
from service.engine_types import Call, SegmentRun
from service.heap import default_trimmer, limit_arenas
from service.ort_setup import device_memory_used, register_shared_cpu_arena, rss_bytes
from service.precision import check_precision
from service.session_pool import SessionKey, SessionPool

log = logging.getLogger("mtserve.engine")


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


SessionFactory = Callable[..., object]


class OrtEngine(BucketedPath, DirectPaths):
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
        session_pool: SessionPool | None = None,
        manage_heap: bool = True,
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
        # sessions of unchanged files shared with other engines (a reload): keyed by sha256 + options
        self._pool = session_pool
        self._sha256 = {
            str(bundle.path(s.name, v)): spec.sha256
            for s in self.manifest.segments
            for v, spec in s.variants.items()
        }
        self._fresh: set[str] | None = None if session_pool is None else set()  # files loaded, not reused
        # loading leaves freed heap resident: given back after start() and stop(), in a thread; and
        # the threads of a reload share malloc arenas instead of each growing one (service/heap.py)
        self._trimmer = default_trimmer() if manage_heap else None
        if manage_heap:
            limit_arenas()
        self.sessions_reused = 0
        self.providers: list[str] = []
        self.ready = False
        self.sessions: dict[tuple, object] = {}
        self._io: dict[tuple[str, str], tuple[str, str]] = {}
        self._bcalls: dict[tuple[str, str, int], BucketCall] = {}
        self._copier: tuple[object, object] | None = None
        self._shared = _shared_variants(self.manifest)
        self._segments: list[SegmentSpec] = list(self.manifest.segments)
        self._task_variants = {t: s.variants for t, s in self.manifest.tasks.items()}
        names, tasks = [s.name for s in self._segments], list(self._task_variants)
        # each task's rank in tree order: a batch whose rows are sorted by it needs no reordering
        self.row_order = {tasks[r]: i for i, r in enumerate(tree_order(tasks, self._task_variants, names))}
        self._describe: dict = {}
        self.fallbacks: list[str] = []

    # -- life cycle -------------------------------------------------------------------------------
    def _options(self, fixed_batch: tuple[str, int] | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.shared_cpu_arena:
            register_shared_cpu_arena()
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

        def create():
            return factory(str(path), self._options(fixed_batch), providers=self._providers(graphs))

        if self._pool is None or graphs:  # a CUDA graph's captured buffers belong to one engine
            return create()
        options = (self.device, self.device_id, self.threads, self.shared_cpu_arena, fixed_batch)
        key = SessionKey(self._sha256[str(path)], (*options, repr(self._providers()), self._factory))
        sess, reused = self._pool.acquire(key, create, self)
        self.sessions_reused += reused
        if not reused and self._fresh is not None:
            self._fresh.add(str(path))
        return sess

    def _warm_tasks(self) -> list[str]:
        """The tasks a warm-up runs: all, or with a session pool only those using a file loaded now
        (reused sessions are warm already)."""
        tasks = list(self.manifest.tasks)
        if self._fresh is None:
            return tasks
        uses = {t: {str(self.bundle.path(s, v)) for s, v in self._task_variants[t].items()} for t in tasks}
        return [t for t in tasks if uses[t] & self._fresh]

    def _memory_now(self) -> int | None:
        return device_memory_used(self.device_id) if self.device == "cuda" else rss_bytes()

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
        self._create_sessions()
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
        if self._trimmer is not None:
            self._trimmer.request(f"engine {self.manifest.version} started")

    def _create_sessions(self) -> None:
        """One session per (segment, variant), checked against the manifest; ``providers`` in use."""
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
            "sessions_reused": self.sessions_reused,
            "bucket_calls": len(self._bcalls),
            "cuda_graphs_captured": graphs,
            "buffers_bytes": int(buffers),
            "fallbacks": list(self.fallbacks),
            "heap": self._heap(),
            **self._describe,
        }  # fmt: skip

    def _heap(self) -> dict | None:
        """The process's heap handling (service/heap.py): the arena cap, the trims so far."""
        if self._trimmer is None:
            return None
        return {"malloc_arenas_max": limit_arenas(), **self._trimmer.stats()}

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
        tasks = self._warm_tasks()
        for task in tasks:
            self.infer(x, [task] * n)
        if tasks:
            self.infer(np.zeros((len(tasks), *shape[1:]), np.float32), tasks)

    def _warmup_host_bucket(self, b: int) -> None:
        """Every (segment, variant) at bucket ``b`` on the host path: one batch of b rows per task
        runs every stem, the trunk and every head at b rows (per-task variants included)."""
        x = np.zeros((b, *self.manifest.input.size), dtype=np.float32)
        for task in self._warm_tasks():
            self.infer(x, [task] * b)

    def stop(self) -> None:
        self.ready = False
        self._bcalls.clear()
        self._copier = None
        self.sessions.clear()
        if self._pool is not None:
            self._pool.release_all(self)
        if self._trimmer is not None:  # sessions no other engine uses are freed by now
            self._trimmer.request(f"engine {self.manifest.version} stopped")

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
