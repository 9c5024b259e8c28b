"""Parameter accounting: total vs task-specific parameters, and bytes held vs N independent models.

Computed from per-unit parameter counts and a resolved plan, so the accounting of any plan can be
known (and the cut matching a target proportion chosen) without building the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from contract.plan import HEAD, SegmentPlan, parse_plan

BYTES_PER_PARAM = 4  # fp32 weights, as exported


class Accounting(BaseModel):
    """What a plan costs; recorded in the manifest's ``accounting`` field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    total_params: int
    task_specific_params: int
    proportion: float  # task_specific / total
    bytes_held: int  # one multi-task model
    bytes_independent: int  # one model per task


def segment_params(seg: SegmentPlan, unit_params: Mapping[str, int], head_params: Mapping[str, int]) -> dict:
    """Parameters of each variant of one segment."""
    if seg.name == HEAD:
        return {seg.assignment[t]: head_params[t] for t in seg.assignment}
    size = sum(unit_params[u] for u in seg.units)
    return {v: size for v in seg.variants}


def account(
    segments: Sequence[SegmentPlan], unit_params: Mapping[str, int], head_params: Mapping[str, int]
) -> Accounting:
    n_tasks = len(segments[0].assignment)
    total = specific = independent = 0
    for seg in segments:
        per_variant = segment_params(seg, unit_params, head_params)
        users = {v: sum(1 for t in seg.assignment.values() if t == v) for v in per_variant}
        total += sum(per_variant.values())
        specific += sum(p for v, p in per_variant.items() if users[v] < n_tasks or seg.name == HEAD)
        independent += sum(per_variant[v] for v in seg.assignment.values())
    return Accounting(
        total_params=total,
        task_specific_params=specific,
        proportion=specific / total if total else 0.0,
        bytes_held=total * BYTES_PER_PARAM,
        bytes_independent=independent * BYTES_PER_PARAM,
    )


def closest_cut(
    kind: str,
    tasks: Sequence[str],
    units: Sequence[str],
    unit_params: Mapping[str, int],
    head_params: Mapping[str, int],
    target: float,
) -> tuple[str, Accounting]:
    """The ``bottom:K`` or ``top:K`` plan whose task-specific proportion is closest to ``target``."""
    if kind not in ("bottom", "top"):
        raise ValueError(f"closest_cut: kind must be 'bottom' or 'top', not {kind!r}")
    best: tuple[float, str, Accounting] | None = None
    for k in range(1, len(units)):
        plan = f"{kind}:{k}"
        acc = account(parse_plan(plan, tasks, units), unit_params, head_params)
        gap = abs(acc.proportion - target)
        if best is None or gap < best[0]:
            best = (gap, plan, acc)
    if best is None:
        raise ValueError("closest_cut: the backbone has a single unit; no cut exists")
    return best[1], best[2]
