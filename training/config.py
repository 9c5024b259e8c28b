"""The training config: one YAML file validated by pydantic (frozen, no unknown keys).

Relative data paths resolve relative to the config file; the output dir resolves relative to the
working directory. ``load_config`` turns every validation problem into one readable ``ConfigError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PlanName = str  # "bottom:K" | "top:K" | "shared" | "independent"
Assignment = dict[str, str] | Literal["shared", "per_task"]


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate (one line, names the file)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TaskConfig(_Frozen):
    """One task: an ImageFolder root holding ``train/`` and ``val/`` (or a named data source)."""

    root: str = Field(description="ImageFolder root with train/ and val/, relative to the config file")
    weight: Annotated[float, Field(gt=0)] = 1.0


class ProportionPlan(_Frozen):
    """``{kind: bottom, proportion: 0.05}``: the cut whose task-specific share is closest."""

    kind: Literal["bottom", "top"]
    proportion: Annotated[float, Field(gt=0, lt=1)]


class OptimizerConfig(_Frozen):
    name: Literal["adamw"] = "adamw"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(_Frozen):
    steps: Annotated[int, Field(ge=1)] = 1000
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    kind: Literal["cosine"] = "cosine"
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.01

    @model_validator(mode="after")
    def _warmup_fits(self) -> ScheduleConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self


class AugmentConfig(_Frozen):
    """Light training augmentation, passed to ``timm.data.create_transform``."""

    scale: tuple[float, float] = (0.6, 1.0)
    hflip: Annotated[float, Field(ge=0, le=1)] = 0.5
    color_jitter: Annotated[float, Field(ge=0)] = 0.0


class TrainConfig(_Frozen):
    tasks: dict[str, TaskConfig]
    backbone: str = "resnet18"
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrained: bool | str = False  # true | hf-hub:ORG/NAME | a local file (training.pretrained)
    plan: PlanName | dict[str, Assignment] | ProportionPlan = "bottom:1"
    input_size: int | tuple[int, int] = 224
    crop_pct: Annotated[float, Field(gt=0, le=1)] | None = None  # eval crop; None: the model's default
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    augment: AugmentConfig = AugmentConfig()
    batch_per_task: Annotated[int, Field(ge=1)] = 32
    eval_batch_size: Annotated[int, Field(ge=1)] = 256
    eval_interval: Annotated[int, Field(ge=1)] = 200
    log_interval: Annotated[int, Field(ge=1)] = 10
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: Annotated[int, Field(ge=0)] = 2
    amp: Literal["off", "bf16", "fp16"] = "bf16"
    channels_last: bool = True
    output_dir: str | None = None

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
        if not tasks:
            raise ValueError("at least one task is needed")
        for name in tasks:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"bad task name {name!r}")
        return tasks

    @field_validator("input_size")
    @classmethod
    def _size(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        sizes = (v,) if isinstance(v, int) else v
        if any(s < 8 for s in sizes):
            raise ValueError(f"input_size {v} is too small (>= 8 px)")
        return v

    @model_validator(mode="after")
    def _plan_tasks(self) -> TrainConfig:
        if isinstance(self.plan, dict):
            for unit, assignment in self.plan.items():
                if isinstance(assignment, dict):
                    unknown = sorted(set(assignment) - set(self.tasks))
                    if unknown:
                        raise ValueError(
                            f"plan at {unit!r}: unknown task(s) {unknown}; tasks are {list(self.tasks)}"
                        )
        return self

    @property
    def image_hw(self) -> tuple[int, int]:
        return (self.input_size, self.input_size) if isinstance(self.input_size, int) else self.input_size

    @property
    def task_weights(self) -> list[float]:
        return [t.weight for t in self.tasks.values()]


def _format_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return "; ".join(parts) + more


def resolve_roots(cfg: TrainConfig, base: Path) -> TrainConfig:
    """Task roots made absolute relative to ``base`` (the config file's folder)."""
    tasks = {}
    for name, task in cfg.tasks.items():
        root = Path(task.root).expanduser()
        tasks[name] = task.model_copy(update={"root": str(root if root.is_absolute() else (base / root))})
    return cfg.model_copy(update={"tasks": tasks})


def parse_config(data: Any, source: str = "config", base: Path | None = None) -> TrainConfig:
    """Validate a config mapping; roots resolve relative to ``base`` when given."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_error(exc)}") from None
    return resolve_roots(cfg, base) if base is not None else cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_config(data, str(path), path.resolve().parent)
