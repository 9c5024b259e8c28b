"""How add-task trains a new task: :class:`AddTaskConfig` (``mtserve train``'s vocabulary plus own/init)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from training.config import AugmentConfig, OptimizerConfig

Init = Literal["stem", "scratch"]
# Measured on the demo (results/add-task/README.md): Fashion-MNIST added to the 3-task demo bundle,
# 3 seeds, val top-1 from a trained stem vs from scratch: 0.758 vs 0.727 at 100 steps, 0.798 vs
# 0.793 at 300; better at every seed.
DEFAULT_INIT: Init = "stem"


class AddTaskConfig(BaseModel):
    """How the new task trains: ``mtserve train``'s vocabulary (optimizer, schedule, augment, batch,
    eval, seed, device, workers) plus what adding needs (own, init, init_from). Unset optimizer and
    augment fields come from the bundle's own training config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: Annotated[int, Field(ge=1)] = 300
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.01
    optimizer: OptimizerConfig | None = None
    augment: AugmentConfig | None = None
    batch_size: Annotated[int, Field(ge=1)] = 64
    eval_batch_size: Annotated[int, Field(ge=1)] = 256
    eval_interval: Annotated[int, Field(ge=1)] | None = None  # default: 4 evaluations
    own: Annotated[int, Field(ge=0)] | None = None  # units owned from the bottom; None: the plan's
    init: Init = DEFAULT_INIT
    init_from: str | None = None  # the task whose variants start the new ones; None: probed
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    workers: Annotated[int, Field(ge=0)] = 1
    threads: Annotated[int, Field(ge=1)] | None = None
