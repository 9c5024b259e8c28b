"""The paper's plan comparison: shared, top:K, bottom:K', independent at equal task-specific proportion.

Every run is the trainer's own ``train()`` on a config dict that differs between runs only in
``plan`` and ``seed``; each finished run is appended to ``results.json`` at once, so an interrupted
experiment resumes where it stopped (a crash loses at most the run in progress).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SCHEMA = 1
RESULTS = "results.json"


@dataclass(frozen=True)
class PlanSpec:
    """One plan of the comparison and where it sits on the task-specific proportion axis."""

    kind: str  # shared | top | bottom | independent
    plan: str  # what the trainer gets: "bottom:11", "top:16", "shared", "independent"
    proportion: float
    level: float | None  # the top:K proportion this plan is matched to (None: unmatched)
    accounting: dict[str, Any]
    match: str | None = None  # a top:K's matched bottom:K' plan


def count_classes(root: Path) -> dict[str, int]:
    """``{task: number of class folders}`` for a data root holding ``<task>/train/<class>/``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    tasks = {}
    for d in sorted(p for p in root.iterdir() if (p / "train").is_dir() and (p / "val").is_dir()):
        tasks[d.name] = sum(1 for c in (d / "train").iterdir() if c.is_dir() and not c.name.startswith("."))
    if not tasks:
        raise FileNotFoundError(f"{root} holds no task folders (<task>/train/<class>/*, <task>/val/...)")
    return tasks


def choose_plans(
    backbone: str,
    tasks: Mapping[str, int],
    timm_kwargs: Mapping[str, Any],
    levels: Sequence[float] | None = None,
    bottom_levels: Sequence[float] = (),
) -> list[PlanSpec]:
    """shared, independent, matched top:K / bottom:K' pairs, and bottom-only levels.

    A matched pair: top:K closest to the level (``None``: the two smallest top proportions the backbone
    allows), then the bottom:K' closest to that top:K's *actual* proportion. ``bottom_levels`` are
    levels no top:K can reach (a CNN's last block is its largest): bottom:K' alone, unmatched.
    """
    from contract.accounting import account, closest_cut
    from contract.plan import parse_plan
    from models.network import MultiTaskNet

    net = MultiTaskNet(backbone, dict(tasks), "shared", **dict(timm_kwargs))
    names, units = net.task_names, [u.name for u in net.units]
    up, hp = net.unit_params(), net.head_params()

    def spec(kind: str, plan: str, level: float | None) -> PlanSpec:
        acc = account(parse_plan(plan, names, units), up, hp)
        return PlanSpec(kind, plan, acc.proportion, level, acc.model_dump())

    out = [spec("shared", "shared", None)]
    if levels is None:
        tops = [f"top:{len(units) - 1}", f"top:{len(units) - 2}"] if len(units) > 2 else [f"top:{1}"]
    else:
        tops = [closest_cut("top", names, units, up, hp, lv)[0] for lv in levels]
    for top in dict.fromkeys(tops):
        t = spec("top", top, None)
        bottom, _ = closest_cut("bottom", names, units, up, hp, t.proportion)
        out.append(PlanSpec("top", top, t.proportion, t.proportion, t.accounting, bottom))
        if all(p.plan != bottom for p in out):  # two tops may share their closest bottom
            out.append(spec("bottom", bottom, t.proportion))
    matched = {p.plan for p in out}
    for lv in bottom_levels:
        bottom, _ = closest_cut("bottom", names, units, up, hp, lv)
        if bottom not in matched:
            out.append(spec("bottom", bottom, None))
            matched.add(bottom)
    out.append(spec("independent", "independent", None))
    return out


def subset_data(src: Path, dst: Path, max_train: int | None, max_val: int | None) -> Path:
    """A symlinked copy of ``src`` with at most N images per class (sorted order); ``src`` if no caps."""
    if not max_train and not max_val:
        return src
    for task in count_classes(src):
        for split, cap in (("train", max_train), ("val", max_val)):
            for cls in sorted(p for p in (src / task / split).iterdir() if p.is_dir()):
                out = dst / task / split / cls.name
                out.mkdir(parents=True, exist_ok=True)
                files = sorted(f for f in cls.iterdir() if f.is_file())
                for f in files[:cap] if cap else files:
                    link = out / f.name
                    if not link.exists():
                        link.symlink_to(f.resolve())
    return dst


def train_config(
    data: Path, tasks: Sequence[str], plan: str, seed: int, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """The trainer config of one run: everything but ``plan`` and ``seed`` is the same for all runs."""
    steps = int(settings["steps"])
    return {
        "tasks": {t: {"root": str(Path(data) / t)} for t in tasks},
        "backbone": settings["backbone"],
        "timm_kwargs": dict(settings["timm_kwargs"]),
        "plan": plan,
        "input_size": settings["input_size"],
        "crop_pct": 1.0,
        "augment": {"scale": [0.7, 1.0], "hflip": 0.0},  # glyphs and digits must not be mirrored
        "optimizer": {"lr": settings["lr"], "weight_decay": settings["weight_decay"]},
        "schedule": {"steps": steps, "warmup_steps": settings["warmup_steps"], "min_lr_ratio": 0.01},
        "batch_per_task": settings["batch_per_task"],
        "eval_batch_size": 256,
        "eval_interval": steps,  # one evaluation, at the last step: no selection on the val set
        "log_interval": max(1, steps // 10),
        "seed": seed,
        "device": settings["device"],
        "workers": settings["workers"],
        "amp": "off",
    }


def train_one(cfg_dict: Mapping[str, Any], run_dir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Train one config in-process with the trainer's public API; final per-task top-1 and timings."""
    from training.config import parse_config
    from training.trainer import train

    cfg = parse_config(dict(cfg_dict), source="experiment")
    res = train(cfg, run_dir, overwrite=True, progress=False, say=lambda *_a, **_k: None)
    acc = {t: v["top1"] for t, v in res.val.items()}
    say(f"    mean top-1 {sum(acc.values()) / len(acc):.4f} in {res.wall_s:.0f} s")
    return {"acc": acc, "wall_s": res.wall_s, "images_per_s": res.images_per_s, "step": res.step}


class Results:
    """``results.json``: settings, environment, plans and every finished run; rewritten atomically."""

    def __init__(self, path: Path, settings: Mapping[str, Any], fresh: bool = False):
        self.path = Path(path)
        self.data: dict[str, Any] = {"schema": SCHEMA, "settings": dict(settings), "datasets": {}, "runs": []}
        if self.path.is_file() and not fresh:
            old = json.loads(self.path.read_text())
            if old.get("settings") != json.loads(json.dumps(dict(settings))):
                raise ValueError(
                    f"{self.path} holds runs with other settings; use another --out or --fresh to replace it"
                )
            self.data = old

    def done(self, dataset: str, plan: str, seed: int) -> bool:
        return any((r["dataset"], r["plan"], r["seed"]) == (dataset, plan, seed) for r in self.data["runs"])

    def add_run(self, run: dict[str, Any]) -> None:
        self.data["runs"].append(run)
        self.save()

    def save(self) -> None:
        self.data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def _plan_dataset(
    results: Results, name: str, root: Path, settings: Mapping[str, Any], say: Callable[[str], None]
) -> list[PlanSpec]:
    """The plans of one dataset, recorded in the results with its tasks."""
    tasks = count_classes(root)
    plans = choose_plans(
        settings["backbone"],
        tasks,
        settings["timm_kwargs"],
        settings["levels"],
        settings["bottom_levels"],
    )
    results.data["datasets"][name] = {"root": str(root), "tasks": tasks, "plans": [asdict(p) for p in plans]}
    say(f"{name}: {len(tasks)} tasks; plans " + ", ".join(f"{p.plan} ({p.proportion:.1%})" for p in plans))
    return plans


def run_experiment(
    datasets: Mapping[str, Path],
    out: Path,
    settings: Mapping[str, Any],
    *,
    fresh: bool = False,
    command: str | None = None,
    say: Callable[[str], None] = print,
) -> Results:
    """All plans x seeds on every dataset (seed-major, so a partial run covers every plan)."""
    import torch

    from training.experiment_report import environment

    torch.set_num_threads(int(settings["threads"]))
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out / RESULTS, settings, fresh)
    results.data.setdefault("environment", environment())
    results.data.setdefault("command", command)
    results.data["last_command"] = command
    plans = {name: _plan_dataset(results, name, Path(root), settings, say) for name, root in datasets.items()}
    results.save()
    work = Path(settings["work_dir"])
    total = sum(len(p) for p in plans.values()) * len(settings["seeds"])
    n = 0
    for seed in settings["seeds"]:
        for name, root in datasets.items():
            caps = settings["max_train_per_class"], settings["max_val_per_class"]
            data = subset_data(Path(root), work / "data" / f"{name}-{caps[0]}-{caps[1]}", *caps)
            tasks = list(count_classes(root))
            for spec in plans[name]:
                n += 1
                if results.done(name, spec.plan, seed):
                    continue
                say(f"[{n}/{total}] {name} {spec.plan} seed {seed}")
                cfg = train_config(data, tasks, spec.plan, seed, settings)
                run = train_one(cfg, work / "runs" / name / spec.plan.replace(":", "") / f"seed{seed}", say)
                results.add_run(
                    {
                        "dataset": name,
                        "kind": spec.kind,
                        "plan": spec.plan,
                        "seed": seed,
                        "proportion": spec.proportion,
                        **run,
                    }
                )
    return results
