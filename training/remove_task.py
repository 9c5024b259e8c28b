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
from training.add_task_bundle import (
    CHECKPOINT,
    CONFIG,
    check_out_dir,
    copy_variant_files,
    finish_manifest,
    history_entry,
    now,
    open_source,
    plan_for,
    read_config,
    task_variant_pairs,
    write_json,
)


def state_key_prefixes(manifest: Manifest, pairs: set[tuple[str, str]]) -> tuple[str, ...]:
    """State-dict prefixes of MultiTaskNet variants: ``segments.<index>.variants.<vid>.``."""
    index = {s.name: i for i, s in enumerate(manifest.segments)}
    return tuple(f"segments.{index[seg]}.variants.{vid}." for seg, vid in sorted(pairs))


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
    source, old = open_source(bundle)
    out = Path(out)
    check_out_dir(out, source)
    if task not in old.tasks:
        raise UserError(f"task {task!r} is not in {source}; tasks are {sorted(old.tasks)}")
    if len(old.tasks) == 1:
        raise UserError(f"{task!r} is the only task of {source}; a bundle needs at least one")
    rest = [t for t in old.tasks if t != task]
    keep = task_variant_pairs(old, rest)
    dropped = task_variant_pairs(old, [task]) - keep
    out.mkdir(parents=True, exist_ok=True)
    copied = copy_variant_files(source, out, old, sorted(keep))

    segments = []
    for seg in old.segments:
        variants = {vid: spec for vid, spec in seg.variants.items() if (seg.name, vid) in keep}
        segments.append(seg.model_copy(update={"variants": variants}))
    cfg = read_config(source)
    plan = plan_for(
        old.model_copy(update={"tasks": {t: old.tasks[t] for t in rest}}), (cfg or {}).get("plan")
    )
    new_version = version or f"{old.version}-{task}"
    data = old.model_dump()
    data.update(
        version=new_version,
        created_at=now(),
        segments=[s.model_dump() for s in segments],
        tasks={t: old.tasks[t].model_dump() for t in rest},
        plan=plan if isinstance(plan, str) else (json.dumps(plan) if plan is not None else old.plan),
    )
    data["parity"] = {s.name: old.parity[s.name] for s in segments if s.name in old.parity}
    manifest = Manifest.model_validate(data)

    notes = []
    if cfg is not None and (source / CHECKPOINT).is_file():
        if plan is None:
            notes.append("checkpoint not carried over: no sharing plan rebuilds the remaining layout")
        else:
            _write_checkpoint(source / CHECKPOINT, out / CHECKPOINT, state_key_prefixes(old, dropped))
            cfg = dict(cfg)
            cfg["plan"] = plan
            cfg["tasks"] = {t: v for t, v in cfg["tasks"].items() if t != task}
            entry = history_entry("remove-task", task, old, to_version=new_version)
            cfg["history"] = [*cfg.get("history", []), entry]
            write_json(out / CONFIG, cfg)
    final = finish_manifest(manifest, out)
    # the accounting recorded with the checkpoint follows the manifest
    if (out / CONFIG).is_file():
        cfg = json.loads((out / CONFIG).read_text())
        cfg["accounting"] = final.accounting.model_dump() if final.accounting else None
        write_json(out / CONFIG, cfg)
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
