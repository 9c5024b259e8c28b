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
    segments: Sequence[SegmentPlan],
    unit_params: Mapping[str, int],
    head_params: Mapping[str, int],
    norm_params: Mapping[str, int] | None = None,
) -> Accounting:
    """``norm_params`` (per unit, the normalisation layers' share of ``unit_params``) is needed for a
    tied segment (``shared+bn``): there only the normalisation parameters are held once per variant."""
    n_tasks = len(segments[0].assignment)
    total = specific = independent = 0
    for seg in segments:
        per_variant = segment_params(seg, unit_params, head_params)
        independent += sum(per_variant[v] for v in seg.assignment.values())
        if seg.tied:
            if norm_params is None:
                raise ValueError(f"segment {seg.name!r} ties its weights: norm_params are needed")
            norm = sum(norm_params[u] for u in seg.units)
            shared = sum(unit_params[u] for u in seg.units) - norm
            total += shared + norm * len(seg.variants)
            specific += norm * len(seg.variants)
            continue
        users = {v: sum(1 for t in seg.assignment.values() if t == v) for v in per_variant}
        total += sum(per_variant.values())
        specific += sum(p for v, p in per_variant.items() if users[v] < n_tasks or seg.name == HEAD)
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


def hidden_head_params(
    head_params: Mapping[str, int], in_features: int, classes: Mapping[str, int], hidden: int
) -> dict[str, int]:
    """Head parameters once each task's linear classifier ``Linear(C, n)`` becomes
    ``Linear(C, H) -> ReLU -> Linear(H, n)`` (a ``head:H`` plan)."""
    return {
        t: p - in_features * classes[t] + in_features * hidden + hidden + hidden * classes[t]
        for t, p in head_params.items()
    }


def closest_head_width(
    tasks: Sequence[str],
    units: Sequence[str],
    unit_params: Mapping[str, int],
    head_params: Mapping[str, int],
    in_features: int,
    classes: Mapping[str, int],
    target: float,
) -> tuple[str, Accounting]:
    """The ``head:H`` plan whose task-specific proportion is closest to ``target`` (the share grows
    with H, so a bisection finds it); ``head_params`` are the plain linear heads' counts."""

    def acc(h: int) -> Accounting:
        heads = hidden_head_params(head_params, in_features, classes, h)
        return account(parse_plan(f"head:{h}", tasks, units), unit_params, heads)

    lo, hi = 1, 1
    while acc(hi).proportion < target and hi < 1 << 24:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if acc(mid).proportion < target else (lo, mid)
    h = min((lo, hi), key=lambda w: abs(acc(w).proportion - target))
    return f"head:{h}", acc(h)
