"""Prometheus metrics, exactly DESIGN.md §6 (prefix ``mtserve_``, base units, bounded labels).

Task labels come only from the loaded manifest: the outermost ASGI layer (service/outer_layer.py) counts a
request only when its path names a known task, so an unknown task never creates a label.
Every app has its own CollectorRegistry (tests build many apps in one process).

With ``--workers N`` (several processes, ``PROMETHEUS_MULTIPROC_DIR`` set by the supervisor before
any of them starts) counters and histograms live in prometheus-client's multiprocess files and any
API process renders the sum over all processes. The gauges are read at scrape time instead, never
from those files: the queue depth from a function (in an API process: the engine's published room),
the model served, and ``mtserve_process_cpu_seconds_total{process}`` from ``/proc``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from contract.manifest import Manifest
from service.engine_types import SegmentRun
from service.metric_buffer import MetricBuffer

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# how stale the other processes' series may be in a scrape with --workers N (docs/server.md)
MULTIPROCESS_FLUSH_S = 0.01
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def pow2_buckets(limit: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to the first power of two >= limit."""
    out = [1.0]
    while out[-1] < limit:
        out.append(out[-1] * 2)
    return tuple(out)


class Metrics:
    """All of the service's metrics, in one registry."""

    def __init__(self, manifest: Manifest, max_batch_size: int):
        r = self.registry = CollectorRegistry(auto_describe=True)
        tasks = list(manifest.tasks)
        self.tasks = frozenset(tasks)
        self.requests = Counter(
            "mtserve_requests", "Requests by task and status code", ["task", "code"], registry=r
        )
        self.request_duration = Histogram(
            "mtserve_request_duration_seconds",
            "Request latency",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "mtserve_queue_duration_seconds",
            "Time from admission to batching",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_duration = Histogram(
            "mtserve_preprocess_duration_seconds",
            "Decode + preprocess per image",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.segment_duration = Histogram(
            "mtserve_segment_duration_seconds",
            "Time of one segment (all its variants) per batch",
            ["segment"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mtserve_batch_size",
            "Rows per onnxruntime call (one variant of a segment)",
            ["segment"],
            buckets=pow2_buckets(max_batch_size),
            registry=r,
        )
        self.batch_tasks = Histogram(
            "mtserve_batch_tasks",
            "Distinct tasks in each call of a shared variant",
            buckets=tuple(float(i) for i in range(1, len(tasks) + 1)),
            registry=r,
        )
        self.rows_spilled = Counter(
            "mtserve_rows_spilled",
            "Requests whose rows went on the socket: no room in the API process's shared memory",
            registry=r,
        )
        self.queue_depth = self.live = ScrapeTime()
        r.register(self.live)
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.manifest = manifest
        self._children: dict[tuple, Histogram] = {}
        self.buffer = MetricBuffer()  # per-request updates on the event loop, applied in bulk
        self._add_labels(manifest)

    def _add_labels(self, manifest: Manifest) -> None:
        """Series exist from the start, at zero, for every task and segment of a loaded manifest."""
        self.tasks = self.tasks | frozenset(manifest.tasks)
        for task in manifest.tasks:
            self.request_duration.labels(task)
            self.queue_duration.labels(task)
        for seg in manifest.segments:
            self.segment_duration.labels(seg.name)
            self.batch_size.labels(seg.name)

    def set_model_info(self, providers: Sequence[str], manifest: Manifest | None = None) -> None:
        """``model_info`` of the bundle served; after a reload (``manifest`` given) the old series is
        removed and the tasks and segments the new manifest adds get their series."""
        if manifest is not None:
            self._add_labels(manifest)
            self.manifest = manifest
        self.live.model_info = (self.manifest.name, self.manifest.version, ",".join(providers))

    def _child(self, metric, *labels: str):
        """``metric.labels(*labels)``, looked up once: ``labels()`` takes a lock and builds a key per
        call, and the routes and the batcher ask per request and per batch."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_segments(self, runs: Sequence[SegmentRun]) -> None:
        """After every batch, on the event loop (buffered: a dozen histogram updates per batch, each
        a locked write to a file in multiprocess mode, were a few percent of the device's thread)."""
        observe = self.buffer.observe
        for run in runs:
            observe(self._child(self.segment_duration, run.segment), run.seconds)
            sizes = self._child(self.batch_size, run.segment)
            for call in run.calls:
                observe(sizes, call.rows)
                if call.shared:
                    observe(self.batch_tasks, call.tasks)

    def observe_queue(self, task: str, seconds: float) -> None:
        self.buffer.observe(self._child(self.queue_duration, task), seconds)

    def buffer_on_this_thread(self) -> None:
        """Buffer the per-request updates made on the calling thread (the event loop's). In one process
        a scrape flushes the buffer, so it sees every answer so far, and the buffer waits up to 50 ms
        for more. With ``--workers N`` a scrape reads the other processes' files, which it cannot
        flush: each process applies its updates at most :data:`MULTIPROCESS_FLUSH_S` after making
        them (one update per bucket touched for all of them; at the end of each turn of the loop, as
        before, it was about one locked file write per request in the engine process)."""
        if self.multiprocess:
            self.buffer.interval = MULTIPROCESS_FLUSH_S
        self.buffer.bind()

    def observe_preprocess(self, seconds: float) -> None:
        self.buffer.observe(self.preprocess_duration, seconds)

    def count_request(self, task: str, status: int, seconds: float) -> None:
        """``requests_total{task,code}`` and ``request_duration_seconds{task}`` of one answered request."""
        counter = self._child(self.requests, task, str(status))
        self.buffer.answered(counter, self._child(self.request_duration, task), seconds)

    def render(self) -> bytes:
        self.buffer.flush()
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(self.live)
        return generate_latest(registry)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, from ``/proc/PID/stat`` (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15 of stat


class ScrapeTime:
    """The gauges read when scraped: ``mtserve_queue_depth`` (``set_function``), ``mtserve_model_info``
    and the CPU seconds of every process of the server (``processes()`` -> name -> pid)."""

    def __init__(self):
        self.function: Callable[[], float] = lambda: 0.0
        self.model_info: tuple[str, str, str] | None = None
        self.processes: Callable[[], dict[str, int]] = lambda: {"main": os.getpid()}

    def set_function(self, function: Callable[[], float]) -> None:
        self.function = function

    def collect(self):
        depth = GaugeMetricFamily("mtserve_queue_depth", "Rows admitted and waiting to be batched")
        depth.add_metric([], float(self.function()))
        info = GaugeMetricFamily(
            "mtserve_model_info", "The bundle served", labels=["bundle", "version", "providers"]
        )
        if self.model_info is not None:
            info.add_metric(list(self.model_info), 1.0)
        cpu = CounterMetricFamily(
            "mtserve_process_cpu_seconds",
            "CPU time (user + system) of each process of the server",
            labels=["process"],
        )
        for name, pid in self.processes().items():
            if (seconds := cpu_seconds(pid)) is not None:
                cpu.add_metric([name], seconds)
        return [depth, info, cpu]


def task_of(path: str) -> str | None:
    """The task a request path names: /predict/{task} or /v2/models/{task}[/versions/{v}]/infer."""
    parts = path.strip("/").split("/")
    if len(parts) == 2 and parts[0] == "predict":
        return parts[1]
    if len(parts) in (4, 6) and parts[:2] == ["v2", "models"] and parts[-1] == "infer":
        return parts[2]
    return None
