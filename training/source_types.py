"""What a data source is: images of one visual domain with labels (numpy only, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from contract.errors import UserError

INSTALL_HINT = "bash scripts/install_mdb_sources.sh"


class SourceUnavailable(UserError):
    """A source's package or files are not installed."""


@dataclass(frozen=True, eq=False)
class Source:
    """Images of one source: uint8 [N,H,W] (grey) or [N,H,W,3] (RGB), int labels."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    licence: str
    origin: str
    groups: np.ndarray | None = None  # split unit per image (e.g. font id); None = the image
    group_kind: str = "image"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise ValueError(f"{self.name}: images must be uint8 [N,H,W] or [N,H,W,3]")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"{self.name}: labels out of range for {len(self.classes)} classes")
