"""Writing a new bundle version next to an old one (torch-free; used by add-task and remove-task).

A new version holds every file of the old one that it still needs, byte for byte (its sha256 is
checked after the copy), plus the files of the variants it adds. The accounting is recomputed from
the manifest's per-variant parameter counts (what :func:`contract.accounting.account` gives for the
network, since a body variant's count is the sum of its units).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from contract.accounting import BYTES_PER_PARAM, Accounting, account
from contract.bundle import load_bundle, sha256_file
from contract.errors import BundleError, UserError
from contract.manifest import MANIFEST_FILE, Manifest
from contract.plan import HEAD, PlanError, SegmentPlan, parse_plan

CHECKPOINT, CONFIG = "checkpoint.safetensors", "config.json"


def manifest_accounting(manifest: Manifest) -> Accounting:
    """Total vs task-specific parameters and bytes held vs one model per task, from the manifest:
    :func:`contract.accounting.account` with each body segment as one unit of its variants' size;
    a variant no task uses is held, and counted task-specific."""
    tasks = manifest.tasks
    segments, unit_params, head_params, unused = [], {}, {}, 0
    for seg in manifest.segments:
        assignment = {t: spec.variants[seg.name] for t, spec in tasks.items()}
        if seg.name == HEAD:
            head_params = {t: seg.variants[vid].params for t, vid in assignment.items()}
        else:
            unit_params[seg.name] = next(iter(seg.variants.values())).params
        segments.append(SegmentPlan(seg.name, (seg.name,), assignment))
        unused += sum(v.params for vid, v in seg.variants.items() if vid not in assignment.values())
    acc = account(segments, unit_params, head_params)
    if not unused:
        return acc
    total, specific = acc.total_params + unused, acc.task_specific_params + unused
    return acc.model_copy(
        update={
            "total_params": total,
            "task_specific_params": specific,
            "proportion": specific / total,
            "bytes_held": total * BYTES_PER_PARAM,
        }
    )


def check_out_dir(out: Path, source: Path) -> None:
    """The new version goes to a new (or empty) folder, never over the old one."""
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the source bundle; a new version needs a folder of its own")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new --out or remove it")


def open_source(bundle: str | Path) -> tuple[Path, Manifest]:
    """The source bundle, verified (manifest, sha256 of every file, shapes)."""
    root = Path(bundle)
    try:
        b = load_bundle(root)
    except BundleError as exc:
        raise UserError(str(exc)) from None
    return root, b.manifest


def copy_variant_files(source: Path, out: Path, manifest: Manifest, keep: Iterable[tuple[str, str]]) -> int:
    """Copy the files of the (segment, variant) pairs in ``keep``; returns the bytes copied.

    Each copy's sha256 is checked against the manifest (the byte-identity the server's session reuse
    relies on)."""
    by_name = {s.name: s for s in manifest.segments}
    copied = 0
    for seg_name, vid in keep:
        spec = by_name[seg_name].variants[vid]
        src, dst = source / spec.file, out / spec.file
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        if sha256_file(dst) != spec.sha256:
            raise BundleError(f"{dst}: copy does not match sha256 {spec.sha256} of {src}")
        copied += dst.stat().st_size
    return copied


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def read_config(source: Path) -> dict[str, Any] | None:
    path = source / CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def finish_manifest(manifest: Manifest, out: Path) -> Manifest:
    """Recompute the accounting, validate (shapes chain, every task has its variants) and write."""
    data = manifest.model_dump()
    data["accounting"] = manifest_accounting(manifest).model_dump()
    final = Manifest.model_validate(data)
    final.write(out)
    load_bundle(out)  # the new version verifies like any bundle the server loads
    return final


def history_entry(action: str, task: str, source: Manifest, **extra: Any) -> dict[str, Any]:
    return {"action": action, "task": task, "from_version": source.version, "at": now(), **extra}


def unchanged_files(old: Manifest, new: Manifest) -> dict[str, bool]:
    """file -> same sha256 in both versions, for every file the new version keeps from the old one."""
    old_files = {v.file: v.sha256 for s in old.segments for v in s.variants.values()}
    return {
        v.file: old_files[v.file] == v.sha256
        for s in new.segments
        for v in s.variants.values()
        if v.file in old_files
    }


def task_variant_pairs(manifest: Manifest, tasks: Mapping[str, Any] | Iterable[str]) -> set[tuple[str, str]]:
    """The (segment, variant) pairs the given tasks use."""
    return {(seg, vid) for t in tasks for seg, vid in manifest.tasks[t].variants.items()}


def manifest_file(out: Path) -> Path:
    return out / MANIFEST_FILE


def explicit_plan(manifest: Manifest) -> dict[str, dict[str, str]]:
    """The manifest's body segments as an explicit plan ``{last unit: {task: variant}}``."""
    return {
        seg.units[-1]: {t: spec.variants[seg.name] for t, spec in manifest.tasks.items()}
        for seg in manifest.segments
        if seg.name != HEAD
    }


def plan_for(manifest: Manifest, plan: Any) -> Any | None:
    """A plan spec that rebuilds exactly the manifest's segments (units and assignments) for its tasks:
    ``plan`` itself when it still does, else the explicit mapping, else None (no torch network can
    have this layout: a checkpoint would not load)."""
    tasks = list(manifest.tasks)
    body = [s for s in manifest.segments if s.name != HEAD]
    units = [u for s in body for u in s.units]
    if not units:
        return None
    want = [(tuple(s.units), {t: manifest.tasks[t].variants[s.name] for t in tasks}) for s in body]
    for candidate in (plan, explicit_plan(manifest)):
        try:
            got = parse_plan(candidate, tasks, units)[:-1]
        except (PlanError, TypeError, AttributeError):
            continue
        if [(tuple(s.units), dict(s.assignment)) for s in got] == want:
            return candidate
    return None
