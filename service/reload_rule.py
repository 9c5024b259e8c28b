"""The rule for replacing a served bundle without a restart (``POST /admin/reload``)."""

from __future__ import annotations

from contract.errors import IncompatibleBundle
from contract.manifest import Manifest


def check_compatible(old: Manifest, new: Manifest, where: str, *, allow_remove: bool = False) -> None:
    """The rule for replacing a served bundle without a restart (409 ``incompatible_bundle``).

    What clients and metrics rely on must not change: the ``input`` spec (clients that send FP32
    tensors preprocess with it), every task served now (a client would get 404), and each such
    task's ``labels`` (names and order: an index must keep its meaning). New tasks may be added;
    served tasks may be removed only when the admin says so (``allow_remove``), never by accident.
    Weights, segments, plan, backbone, name and version may change.
    """
    if new.input != old.input:
        a, b = old.input.model_dump(), new.input.model_dump()
        fields = ", ".join(f"input.{f} {b[f]!r} (served: {a[f]!r})" for f in a if a[f] != b[f])
        raise IncompatibleBundle(f"{where}: field {fields}; the input spec must not change on reload")
    missing = [t for t in old.tasks if t not in new.tasks]
    if missing and not allow_remove:
        raise IncompatibleBundle(
            f"{where}: field tasks lacks {missing}, served now; a reload may add tasks, not remove them "
            '(to remove them, reload with {"allow_remove": true})'
        )
    for task, spec in old.tasks.items():
        if task in new.tasks and new.tasks[task].labels != spec.labels:
            raise IncompatibleBundle(
                f"{where}: field tasks.{task}.labels differs from the served one "
                f"({len(new.tasks[task].labels)} vs {len(spec.labels)} labels); labels must keep their "
                "names and order on reload"
            )
