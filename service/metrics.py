"""Prometheus metrics, exactly DESIGN.md §6 (prefix ``mtserve_``, base units, bounded labels).

Task labels come only from the loaded manifest: the outermost ASGI layer (service/outer_layer.py) counts a
request only when its path names a known task, so an unknown task never creates a label.
Every app has its own CollectorRegistry (tests build many apps in one process).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from contract.manifest import Manifest
from service.engine_types import SegmentRun

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
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
        self.queue_depth = Gauge("mtserve_queue_depth", "Rows admitted and waiting to be batched", registry=r)
        self.model_info = Gauge(
            "mtserve_model_info", "The bundle served", ["bundle", "version", "providers"], registry=r
        )
        self.manifest = manifest
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
        self.model_info.clear()
        self.model_info.labels(self.manifest.name, self.manifest.version, ",".join(providers)).set(1)

    def observe_segments(self, runs: Sequence[SegmentRun]) -> None:
        """Called from the executor thread after every batch."""
        for run in runs:
            self.segment_duration.labels(run.segment).observe(run.seconds)
            sizes = self.batch_size.labels(run.segment)
            for call in run.calls:
                sizes.observe(call.rows)
                if call.shared:
                    self.batch_tasks.observe(call.tasks)

    def observe_queue(self, task: str, seconds: float) -> None:
        self.queue_duration.labels(task).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def task_of(path: str) -> str | None:
    """The task a request path names: /predict/{task} or /v2/models/{task}[/versions/{v}]/infer."""
    parts = path.strip("/").split("/")
    if len(parts) == 2 and parts[0] == "predict":
        return parts[1]
    if len(parts) in (4, 6) and parts[:2] == ["v2", "models"] and parts[-1] == "infer":
        return parts[2]
    return None
