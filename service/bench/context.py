"""What every scenario needs: the models under test, the durations, the output folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from contract.bundle import load_bundle
from contract.manifest import Manifest
from service.bench.machine import describe


@dataclass
class BenchModel:
    """A model under test: ``bundle`` for engine/P1/P3/P4/P5, ``bundle8`` (8+ tasks) for P2."""

    key: str  # "demo" or "r50"
    bundle: Path
    bundle8: Path
    p99_target_ms: float
    warmup_s: float = 0.5
    singles: list[Path] = field(default_factory=list)  # independent single-task bundles (P3)

    def manifest(self, which: str = "bundle") -> Manifest:
        return load_bundle(getattr(self, which), verify_sha256=False).manifest


@dataclass
class BenchContext:
    """How a scenario runs: output folder, threads, durations, batching, device."""

    out: Path
    threads: int = 2
    seconds: float = 5.0  # per load point
    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    rates: tuple[float, ...] = (0.3, 0.6, 0.9, 1.2, 1.5)  # open loop: x the closed-loop throughput
    mixes: tuple[str, ...] = ("uniform", "zipf")
    quick: bool = False
    device: str = "cpu"  # cuda: the engine and the servers use the CUDA provider (IOBinding)
    loadgen: str = "auto"  # closed-loop saturation (P1): auto, wrk, hey, python (service/bench/wrk.py)
    service_workers: tuple[str, ...] = ("auto",)  # P1, P5: the server's --workers values, in one run
    saturation: tuple[int, ...] = (2, 4)  # P1: clients in flight, x the max batch size; the best is P1

    def workers_args(self, workers: str) -> tuple[str, ...]:
        """``--workers`` for one of :attr:`service_workers` (none for ``auto``: the server's default)."""
        return () if workers == "auto" else ("--workers", workers)

    def server_args(self, *extra: str) -> list[str]:
        return [
            *("--max-batch-size", str(self.max_batch_size), "--max-wait-ms", str(self.max_wait_ms)),
            *("--device", self.device, *extra),
        ]

    def header(self, scenario: str, model: BenchModel, title: str) -> dict:
        return {
            "scenario": scenario,
            "model": model.key,
            "title": title,
            "bundle": str(model.bundle),
            "machine": describe(self.device),
            "config": {
                "device": self.device,
                "threads": self.threads,
                "seconds_per_point": self.seconds,
                "max_batch_size": self.max_batch_size,
                "max_wait_ms": self.max_wait_ms,
            },
        }
