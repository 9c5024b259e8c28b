"""The bit-identity guard of add-task: the other tasks' parameters, buffers (BatchNorm statistics)
and logits on fixed inputs are recorded before the new task trains and compared bit for bit after."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.network import MultiTaskNet


@torch.no_grad()
def reference_logits(net: MultiTaskNet, tasks: Sequence[str], size: Sequence[int], seed: int = 123):
    x = torch.randn(4, *size, generator=torch.Generator().manual_seed(seed))
    return {t: net.forward_task(x, t).clone() for t in tasks}


@dataclass
class Snapshot:
    """The other tasks as they were: their logits on fixed inputs and every tensor of the network."""

    tasks: list[str]
    size: tuple[int, ...]
    logits: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]


def snapshot(net: MultiTaskNet, tasks: Sequence[str], size: Sequence[int]) -> Snapshot:
    logits = reference_logits(net, tasks, size)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    return Snapshot(list(tasks), tuple(size), logits, state)


def check_unchanged(net: MultiTaskNet, before: Snapshot) -> None:
    """Raise if any tensor of the snapshot or any of its tasks' logits moved by one bit."""
    state = net.state_dict()
    moved = [k for k, v in before.state.items() if not torch.equal(state[k], v)]
    after = reference_logits(net, before.tasks, before.size)
    changed = [t for t in before.tasks if not torch.equal(before.logits[t], after[t])]
    if moved or changed:
        raise RuntimeError(f"add-task changed other tasks: tensors {moved[:5]}, logits of {changed}")


def logits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality of two float arrays (NaN-safe)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
