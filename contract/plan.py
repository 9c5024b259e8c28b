"""Sharing plans and row grouping. Pure Python: used by training (torch) and serving (onnxruntime).

A backbone body is a list of U *units* (the stem, then every block). A cut K sits after unit K-1.
A plan maps every unit to a {task: variant} assignment; consecutive units that assign tasks the same
way form one *segment*. The per-task classifier head is always the last segment.

Two plans reach below a block's granularity (issue 15):

- ``head:H``: every body unit shared, each task's head widened with a hidden layer of width H
  (pool -> Linear(C, H) -> ReLU -> Linear(H, classes)); H tunes the task-specific share finely, so a
  top-specific plan can meet a small bottom-specific one at equal share.
- ``shared+bn``: every weight shared except normalisation layers (BatchNorm), one per task: the body
  is per task with *tied* weights (``SegmentPlan.tied``), so each task's variant is a complete module
  (and exports like any variant) while only its normalisation parameters and statistics are its own.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

HEAD = "head"
SHARED_BN = "shared+bn"


class PlanError(ValueError):
    """A sharing plan that does not fit the tasks or the backbone."""


@dataclass(frozen=True)
class SegmentPlan:
    """One segment: a run of body units (or the head) and which variant each task uses."""

    name: str
    units: tuple[str, ...]
    assignment: Mapping[str, str]  # task -> variant id
    tied: bool = False  # variants share every weight but their normalisation layers (shared+bn)

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.assignment.values()))

    @property
    def shared(self) -> bool:
        return len(self.variants) == 1


def _shared(tasks: Sequence[str]) -> dict[str, str]:
    return {t: "shared" for t in tasks}


def _per_task(tasks: Sequence[str]) -> dict[str, str]:
    return {t: t for t in tasks}


def parse_plan(
    plan: str | Mapping[str, Mapping[str, str]],
    tasks: Sequence[str],
    units: Sequence[str],
) -> list[SegmentPlan]:
    """Resolve a plan into segments (body segments first, then the head).

    ``plan`` is ``"bottom:K"``, ``"top:K"``, ``"head:H"``, ``"shared"``, ``"shared+bn"``,
    ``"independent"``, or an explicit mapping ``{last_unit_of_segment: {task: variant}}`` in body
    order, whose last key is the last unit.
    """
    if not tasks:
        raise PlanError("a plan needs at least one task")
    if len(set(tasks)) != len(tasks):
        raise PlanError(f"duplicate task names in {list(tasks)}")
    n = len(units)
    per_unit: list[dict[str, str]]
    if isinstance(plan, str):
        kind, _, arg = plan.partition(":")
        if kind in ("shared", "independent", SHARED_BN) and not arg:
            per_unit = [(_shared if kind == "shared" else _per_task)(tasks) for _ in units]
        elif kind == "head":
            head_hidden(plan)  # validates H
            per_unit = [_shared(tasks) for _ in units]
        elif kind in ("bottom", "top"):
            try:
                k = int(arg)
            except ValueError:
                raise PlanError(f"plan {plan!r}: K must be an integer cut in 1..{n - 1}") from None
            if not 1 <= k <= n - 1:
                raise PlanError(
                    f"plan {plan!r}: K={k} out of range; this backbone has {n} units, so K must be in "
                    f"1..{n - 1} (use 'shared' or 'independent' for the extremes)"
                )
            low, high = (_per_task, _shared) if kind == "bottom" else (_shared, _per_task)
            per_unit = [low(tasks) if i < k else high(tasks) for i in range(n)]
        else:
            raise PlanError(
                f"unknown plan {plan!r}; expected bottom:K, top:K, head:H, shared, {SHARED_BN}, "
                "independent or an explicit mapping"
            )
    else:
        per_unit = _explicit(plan, tasks, units)
    segments = _segments(per_unit, units, tasks)
    if plan == SHARED_BN and len(tasks) > 1:
        segments = [SegmentPlan(s.name, s.units, s.assignment, tied=s.name != HEAD) for s in segments]
    return segments


def head_hidden(plan: object) -> int | None:
    """The hidden width H of a ``head:H`` plan (None for any other plan)."""
    if not isinstance(plan, str) or not plan.startswith("head:"):
        return None
    arg = plan.partition(":")[2]
    if not arg.isdigit() or int(arg) < 1:
        raise PlanError(f"plan {plan!r}: H must be a positive integer (the head's hidden width)")
    return int(arg)


def _explicit(plan: Mapping[str, Mapping[str, str]], tasks: Sequence[str], units: Sequence[str]):
    index = {u: i for i, u in enumerate(units)}
    per_unit: list[dict[str, str]] = []
    last = -1
    for end, assignment in plan.items():
        if end not in index:
            raise PlanError(f"explicit plan: unknown unit {end!r}; units are {list(units)}")
        if index[end] <= last:
            raise PlanError(f"explicit plan: unit {end!r} is out of order")
        if isinstance(assignment, str) and assignment in ("shared", "per_task"):
            assignment = _shared(tasks) if assignment == "shared" else _per_task(tasks)
        unknown = sorted(set(assignment) - set(tasks))
        if unknown:
            raise PlanError(f"explicit plan at {end!r}: unknown task(s) {unknown}; tasks are {list(tasks)}")
        missing = [t for t in tasks if t not in assignment]
        if missing:
            raise PlanError(f"explicit plan at {end!r}: no variant for task(s) {missing}")
        per_unit += [dict(assignment)] * (index[end] - last)
        last = index[end]
    if last != len(units) - 1:
        raise PlanError(f"explicit plan must end at the last unit {units[-1]!r}")
    return per_unit


def _segments(
    per_unit: list[dict[str, str]], units: Sequence[str], tasks: Sequence[str]
) -> list[SegmentPlan]:
    groups: list[tuple[list[str], dict[str, str]]] = []
    for unit, assignment in zip(units, per_unit, strict=True):
        if groups and _same_partition(groups[-1][1], assignment):
            groups[-1][0].append(unit)
        else:
            groups.append(([unit], assignment))
    seen: dict[str, int] = {}
    out: list[SegmentPlan] = []
    reached_shared = False
    any_shared = any(len(set(a.values())) == 1 for _, a in groups)
    for unit_list, assignment in groups:
        shared = len(set(assignment.values())) == 1
        base = "trunk" if shared else ("branch" if reached_shared else "stem")
        reached_shared = reached_shared or shared
        if len(tasks) == 1 or not any_shared:  # nothing shared (one task, independent): the body
            base = "body"
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}{seen[base]}"
        out.append(SegmentPlan(name, tuple(unit_list), assignment))
    out.append(SegmentPlan(HEAD, (HEAD,), _per_task(tasks)))
    return out


def _same_partition(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Two assignments group tasks the same way and use the same variant names."""
    return dict(a) == dict(b)


def group_rows(keys: Sequence[Hashable]) -> list[tuple[Hashable, list[int]]]:
    """Group row indices by key, in order of first appearance.

    This is how a segment runs, in training and serving alike: each variant runs once on its rows.
    """
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.items())
