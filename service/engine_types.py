"""What the batcher needs from an engine, and what an engine reports of each batch (for metrics)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from contract.manifest import Manifest


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
        """Logits per row (each of its task's width) and what each segment did. An engine may also have
        ``row_order`` (task -> rank): the batcher then hands it the rows sorted by it (stable), the order
        in which it computes them without a copy."""
        ...
