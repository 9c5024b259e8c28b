"""The bundle manifest: the contract between the exporter (writer) and the server (reader).

Layout of a bundle directory (DESIGN.md §3)::

    manifest.json
    segments/<segment>/<variant>.onnx
    checkpoint.safetensors + config.json   (optional)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputSpec(_Frozen):
    """Preprocessing, as timm's data config resolves it."""

    size: tuple[int, int, int]  # [C, H, W]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"


class VariantSpec(_Frozen):
    file: str  # relative to the bundle root, e.g. segments/stem/taskA.onnx
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    params: int = Field(ge=0)


class SegmentSpec(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # Shapes without the batch axis. The head's output width differs per task: use -1 there.
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    variants: dict[str, VariantSpec]
    units: list[str] = Field(default_factory=list)  # backbone blocks this segment holds

    @property
    def shared(self) -> bool:
        return len(self.variants) == 1


class TaskSpec(_Frozen):
    labels: list[str] = Field(min_length=2)
    variants: dict[str, str]  # segment name -> variant id


class Accounting(_Frozen):
    total_params: int
    task_specific_params: int
    proportion: float
    bytes_held: int
    bytes_independent: int


class Manifest(_Frozen):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str
    created_at: str
    backbone: str = ""
    plan: str = ""
    input: InputSpec
    segments: list[SegmentSpec] = Field(min_length=1)
    tasks: dict[str, TaskSpec] = Field(min_length=1)
    parity: dict[str, float] = Field(default_factory=dict)  # segment -> max |onnx - torch|
    accounting: Accounting | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = [s.name for s in self.segments]
        if len(set(names)) != len(names):
            raise ValueError(f"segments: duplicate segment names {names}")
        by_name = {s.name: s for s in self.segments}
        for task, spec in self.tasks.items():
            missing = [n for n in names if n not in spec.variants]
            if missing:
                raise ValueError(f"tasks.{task}.variants: no variant for segment(s) {missing}")
            for seg, vid in spec.variants.items():
                if seg not in by_name:
                    raise ValueError(f"tasks.{task}.variants: unknown segment {seg!r}")
                if vid not in by_name[seg].variants:
                    raise ValueError(f"tasks.{task}.variants.{seg}: unknown variant {vid!r}")
        return self

    def variant_of(self, task: str, segment: str) -> str:
        return self.tasks[task].variants[segment]

    @classmethod
    def read(cls, bundle_dir: str | Path) -> Manifest:
        path = Path(bundle_dir) / MANIFEST_FILE
        return cls.model_validate(json.loads(path.read_text()))

    def write(self, bundle_dir: str | Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path
