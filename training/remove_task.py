"""``mtserve remove-task BUNDLE --task NAME --out NEW_BUNDLE``: a new bundle version without one task.

Torch-free: the manifest loses the task, the variants only that task used lose their files, every
other file is copied byte for byte (same sha256, so a server reloading it reuses its sessions), the
checkpoint loses the removed variants' tensors (read and written with ``safetensors.numpy``) and the
accounting is recomputed. Serving it in place of the old version is an explicit admin action:
``POST /admin/reload`` with ``{"bundle": ..., "allow_remove": true}``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from contract.errors import UserError
from contract.manifest import Manifest
from training import add_task_bundle as nb


def state_key_prefixes(manifest: Manifest, pairs: set[tuple[str, str]]) -> tuple[str, ...]:
    """State-dict prefixes of MultiTaskNet variants: ``segments.<index>.variants.<vid>.``."""
    index = {s.name: i for i, s in enumerate(manifest.segments)}
    return tuple(f"segments.{index[seg]}.variants.{vid}." for seg, vid in sorted(pairs))


def _check_request(source: Path, old: Manifest, out: Path, task: str) -> None:
    nb.check_out_dir(out, source)
    if task not in old.tasks:
        raise UserError(f"task {task!r} is not in {source}; tasks are {sorted(old.tasks)}")
    if len(old.tasks) == 1:
        raise UserError(f"{task!r} is the only task of {source}; a bundle needs at least one")


def _new_manifest(
    old: Manifest, rest: list[str], keep: set[tuple[str, str]], plan: Any, version: str
) -> Manifest:
    """The old manifest without the removed task and the variants only it used (no accounting yet)."""
    segments = []
    for seg in old.segments:
        variants = {vid: spec for vid, spec in seg.variants.items() if (seg.name, vid) in keep}
        segments.append(seg.model_copy(update={"variants": variants}))
    data = old.model_dump()
    data.update(
        version=version,
        created_at=nb.now(),
        segments=[s.model_dump() for s in segments],
        tasks={t: old.tasks[t].model_dump() for t in rest},
        plan=plan if isinstance(plan, str) else (json.dumps(plan) if plan is not None else old.plan),
    )
    data["parity"] = {s.name: old.parity[s.name] for s in segments if s.name in old.parity}
    return Manifest.model_validate(data)


def _carry_checkpoint(
    source: Path, out: Path, old: Manifest, task: str, version: str, plan: Any, dropped: set[tuple[str, str]]
) -> list[str]:
    """The checkpoint without the dropped variants' tensors and the config without the task (when the
    source has both and a plan rebuilds the remaining layout); returns notes on what was not carried."""
    cfg = nb.read_config(source)
    if cfg is None or not (source / nb.CHECKPOINT).is_file():
        return []
    if plan is None:
        return ["checkpoint not carried over: no sharing plan rebuilds the remaining layout"]
    _write_checkpoint(source / nb.CHECKPOINT, out / nb.CHECKPOINT, state_key_prefixes(old, dropped))
    cfg = dict(cfg)
    cfg["plan"] = plan
    cfg["tasks"] = {t: v for t, v in cfg["tasks"].items() if t != task}
    entry = nb.history_entry("remove-task", task, old, to_version=version)
    cfg["history"] = [*cfg.get("history", []), entry]
    nb.write_json(out / nb.CONFIG, cfg)
    return []


def remove_task(
    bundle: str | Path,
    task: str,
    out: str | Path,
    *,
    version: str | None = None,
    log=print,
) -> dict[str, Any]:
    """Write ``out``: ``bundle`` without ``task``. Returns a summary (files kept, removed, bytes)."""
    t0 = time.perf_counter()
    source, old = nb.open_source(bundle)
    out = Path(out)
    _check_request(source, old, out, task)
    rest = [t for t in old.tasks if t != task]
    keep = nb.task_variant_pairs(old, rest)
    dropped = nb.task_variant_pairs(old, [task]) - keep
    out.mkdir(parents=True, exist_ok=True)
    copied = nb.copy_variant_files(source, out, old, sorted(keep))
    plan = nb.plan_for(
        old.model_copy(update={"tasks": {t: old.tasks[t] for t in rest}}),
        (nb.read_config(source) or {}).get("plan"),
    )
    new_version = version or f"{old.version}-{task}"
    manifest = _new_manifest(old, rest, keep, plan, new_version)
    notes = _carry_checkpoint(source, out, old, task, new_version, plan, dropped)
    final = nb.finish_manifest(manifest, out)
    # the accounting recorded with the checkpoint follows the manifest
    if (out / nb.CONFIG).is_file():
        cfg = json.loads((out / nb.CONFIG).read_text())
        cfg["accounting"] = final.accounting.model_dump() if final.accounting else None
        nb.write_json(out / nb.CONFIG, cfg)
    summary = {
        "task": task,
        "from_version": old.version,
        "version": final.version,
        "kept_files": len(keep),
        "removed_files": sorted(old_file(old, p) for p in dropped),
        "bytes_copied": copied,
        "wall_s": round(time.perf_counter() - t0, 3),
        "notes": notes,
    }
    log(
        f"removed {task!r}: {source} v{old.version} -> {out} v{final.version}; {len(keep)} files kept "
        f"byte-identical, {len(dropped)} dropped ({', '.join(summary['removed_files'])}); "
        f"{summary['wall_s']:.1f} s"
    )
    for note in notes:
        log(f"note: {note}")
    return summary


def old_file(manifest: Manifest, pair: tuple[str, str]) -> str:
    seg = next(s for s in manifest.segments if s.name == pair[0])
    return seg.variants[pair[1]].file


def _write_checkpoint(src: Path, dst: Path, drop: tuple[str, ...]) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    tensors: dict = {}
    with safe_open(str(src), "np") as f:
        metadata: Mapping[str, str] | None = f.metadata()
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if not key.startswith(drop):
                tensors[key] = f.get_tensor(key)
    save_file(tensors, str(dst), metadata=dict(metadata) if metadata else None)


# -- CLI ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="the bundle to remove a task from (left unchanged)")
    parser.add_argument("--task", required=True, help="the task to remove")
    parser.add_argument("--out", type=Path, required=True, help="the new bundle version's folder")
    parser.add_argument("--version", help="the new version (default: <old version>-<task>)")


def run(args: argparse.Namespace) -> int:
    remove_task(args.bundle, args.task, args.out, version=args.version)
    print(
        'serve it with POST /admin/reload {"bundle": ..., "allow_remove": true} '
        "(a plain reload refuses to drop a served task)"
    )
    return 0
