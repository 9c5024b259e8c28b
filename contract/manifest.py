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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from contract.accounting import Accounting
from contract.errors import BundleError, UnknownTask

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


# Numeric precision of one ONNX file: "fp32" as exported; "int8" (onnxruntime static quantization,
# QDQ) and "fp16" (float16 weights and compute, float32 inputs/outputs) as `mtserve quantize` writes.
Precision = Literal["fp32", "fp16", "int8"]


class VariantSpec(_Frozen):
    file: str  # relative to the bundle root, e.g. segments/stem/taskA.onnx
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    params: int = Field(ge=0)
    precision: Precision = "fp32"  # absent in bundles written before reduced precision: fp32


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


class TaskAccuracy(_Frozen):
    """One task's top-1 on its validation images: the fp32 bundle vs the reduced one (percent)."""

    images: int = Field(ge=1)
    top1_fp32: float
    top1_reduced: float
    drop: float  # top1_fp32 - top1_reduced, in points (negative: the reduced bundle did better)
    agreement: float  # percent of images whose top-1 class is the same in both bundles


class ReducedPrecision(_Frozen):
    """How a reduced-precision bundle was made from its fp32 source, and what it measured."""

    precision: Literal["fp16", "int8"]
    source: str  # the fp32 bundle: "name vversion (manifest sha256 ...)"
    method: dict[str, str | int | float | bool | list[str]] = Field(default_factory=dict)
    eval_split: str = "val"
    eval_provider: str = "CPUExecutionProvider"
    max_accuracy_drop: float
    tasks: dict[str, TaskAccuracy]
    max_abs_diff: dict[str, float] = Field(default_factory=dict)  # segment -> max |reduced - fp32|


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
    reduced_precision: ReducedPrecision | None = None  # set by `mtserve quantize` (docs/precision.md)

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

    def task(self, name: str) -> TaskSpec:
        """The task's spec; :class:`UnknownTask` (404) naming the tasks there are."""
        spec = self.tasks.get(name)
        if spec is None:
            raise UnknownTask(f"unknown task {name!r}; tasks are {sorted(self.tasks)}")
        return spec

    def variant_of(self, task: str, segment: str) -> str:
        return self.tasks[task].variants[segment]

    @property
    def precisions(self) -> set[str]:
        """The precisions of the bundle's files ({"fp32"} for an exported bundle)."""
        return {v.precision for s in self.segments for v in s.variants.values()}

    @classmethod
    def read(cls, bundle_dir: str | Path) -> Manifest:
        """The manifest of a bundle directory (:func:`read_manifest`)."""
        return read_manifest(Path(bundle_dir))

    def write(self, bundle_dir: str | Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2, exclude=self._unset_precision()) + "\n")
        return path

    def _unset_precision(self) -> dict:
        """The reduced-precision fields left out while at their defaults (fp32, no report), so that an
        fp32 bundle's manifest still reads in servers older than them (they refuse unknown fields)."""
        segments = {
            i: {"variants": {vid: {"precision"} for vid, v in seg.variants.items() if v.precision == "fp32"}}
            for i, seg in enumerate(self.segments)
        }
        unset = {"reduced_precision": True} if self.reduced_precision is None else {}
        return {"segments": segments} | unset


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def read_manifest(root: Path) -> Manifest:
    """The one reader: a :class:`BundleError` naming the file and the field on any problem."""
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    if not path.is_file():
        raise BundleError(f"{path}: missing (a bundle holds {MANIFEST_FILE} and segments/)")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"field {_loc(e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise BundleError(f"{path}: {problems}") from None
