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
    small_levels: Sequence[float] = (),
    bn_ablation: bool = False,
) -> list[PlanSpec]:
    """shared, shared+bn, matched top:K / bottom:K' pairs, small-budget head:H / bottom:K' pairs,
    bottom-only levels, independent.

    A matched pair: top:K closest to the level (``None``: the two smallest top proportions the backbone
    allows), then the bottom:K' closest to that top:K's *actual* proportion. A small-budget pair
    (``small_levels``, below what any top:K reaches): bottom:K' closest to the level, then the ``head:H``
    (shared body, per-task head with a hidden layer of width H) closest to that bottom's proportion.
    ``bottom_levels``: bottom:K' alone, unmatched.
    """
    from contract.accounting import account, closest_cut, closest_head_width, hidden_head_params
    from contract.plan import head_hidden, parse_plan
    from models.network import MultiTaskNet

    net = MultiTaskNet(backbone, dict(tasks), "shared", **dict(timm_kwargs))
    names, units = net.task_names, [u.name for u in net.units]
    up, hp, norms, width = net.unit_params(), net.head_params(), net.norm_params(), net.classifier_in_features

    def spec(kind: str, plan: str, level: float | None, match: str | None = None) -> PlanSpec:
        h = head_hidden(plan)
        heads = hidden_head_params(hp, width, tasks, h) if h else hp
        acc = account(parse_plan(plan, names, units), up, heads, norms)
        return PlanSpec(kind, plan, acc.proportion, level, acc.model_dump(), match)

    out = [spec("shared", "shared", None)] + ([spec("bn", "shared+bn", None)] if bn_ablation else [])
    if levels is None:
        tops = [f"top:{len(units) - 1}", f"top:{len(units) - 2}"] if len(units) > 2 else [f"top:{1}"]
    else:
        tops = [closest_cut("top", names, units, up, hp, lv)[0] for lv in levels]
    pairs = [(spec("top", top, None), None) for top in dict.fromkeys(tops)]
    for lv in small_levels:
        bottom = spec("bottom", closest_cut("bottom", names, units, up, hp, lv)[0], None)
        head, _ = closest_head_width(names, units, up, hp, width, tasks, bottom.proportion)
        if all(p.plan != head for p, _ in pairs):  # two levels may land on one bottom (MobileNetV3)
            pairs.append((spec("top", head, None), bottom))
    for top, bottom in pairs:
        if bottom is None:
            bottom = spec("bottom", closest_cut("bottom", names, units, up, hp, top.proportion)[0], None)
        level = bottom.proportion if top.plan.startswith("head:") else top.proportion
        out.append(PlanSpec("top", top.plan, top.proportion, level, top.accounting, bottom.plan))
        if all(p.plan != bottom.plan for p in out):  # two tops may share their closest bottom
            out.append(PlanSpec("bottom", bottom.plan, bottom.proportion, level, bottom.accounting))
    for lv in bottom_levels:
        bottom, _ = closest_cut("bottom", names, units, up, hp, lv)
        if all(p.plan != bottom for p in out):
            out.append(spec("bottom", bottom, None))
    return [*out, spec("independent", "independent", None)]


def task_subsets(root: Path, counts: Sequence[int], work: Path) -> dict[str, Path]:
    """``{"<n>tasks": folder}``: the first n task folders of ``root`` (name order), symlinked, for each
    n below the number of tasks (the number of tasks varied, as in the paper)."""
    names = list(count_classes(root))
    out = {}
    for n in sorted(set(counts)):
        if 1 < n < len(names):
            dst = work / "data" / f"{Path(root).name}-{n}tasks"
            dst.mkdir(parents=True, exist_ok=True)
            for task in names[:n]:
                link = dst / task
                if not link.exists():
                    link.symlink_to(Path(root, task).resolve())
            out[f"{n}tasks"] = dst
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
        # evaluations only record the curve (and checkpoint for resuming): the result is the last step's
        "eval_interval": max(1, steps // int(settings.get("curve_points", 1))),
        "log_interval": max(1, steps // 10),
        "seed": seed,
        "device": settings["device"],
        "workers": settings["workers"],
        "amp": "off",
    }


def train_one(
    cfg_dict: Mapping[str, Any],
    run_dir: Path,
    say: Callable[[str], None],
    predictions: Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train one config in-process with the trainer's public API; final per-task top-1 and timings.

    ``predictions``: also write the per-image val predictions of the final weights there (npz), checked
    against the trainer's own accuracy. ``resume``: continue a run that was interrupted mid-way.
    """
    from training.config import parse_config
    from training.predictions import accuracy, save_predictions, val_predictions
    from training.trainer import train

    cfg = parse_config(dict(cfg_dict), source="experiment")
    res = train(cfg, run_dir, resume=resume, overwrite=not resume, progress=False, say=lambda *_a, **_k: None)
    acc = {t: v["top1"] for t, v in res.val.items()}
    say(f"    mean top-1 {sum(acc.values()) / len(acc):.4f} in {res.wall_s:.0f} s")
    run = {"acc": acc, "wall_s": res.wall_s, "images_per_s": res.images_per_s, "step": res.step}
    if predictions is not None:
        preds = val_predictions(run_dir, "last")
        check = accuracy(preds)
        if any(abs(check[t] - acc[t]) > 1e-9 for t in acc):
            raise RuntimeError(f"{run_dir}: predictions give {check}, the trainer {acc}")
        save_predictions(predictions, preds)
    return run


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
        settings.get("small_levels", ()),
        settings.get("bn_ablation", False),
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
                results.add_run(_run_one(cfg, name, spec, seed, work, out, say))
    return results


def _run_one(
    cfg: Mapping[str, Any], name: str, spec: PlanSpec, seed: int, work: Path, out: Path, say
) -> dict[str, Any]:
    """One run (continued from its last checkpoint when an interrupted one with the same config is
    there), its per-image predictions under ``out/predictions``, its validation curve."""
    from training.config import parse_config
    from training.run_files import read_run_config

    run_dir = work / "runs" / name / spec.plan.replace(":", "") / f"seed{seed}"
    resume = (run_dir / "state.json").is_file() and (run_dir / "last.safetensors").is_file()
    if resume:
        asked = parse_config(dict(cfg), source="experiment").model_dump(mode="json")
        resume = read_run_config(run_dir).train_config == asked
    rel = Path("predictions") / name / spec.plan.replace(":", "") / f"seed{seed}.npz"
    run = train_one(cfg, run_dir, say, predictions=out / rel, resume=resume)
    return {
        "dataset": name,
        "kind": spec.kind,
        "plan": spec.plan,
        "seed": seed,
        "proportion": spec.proportion,
        **run,
        "predictions": rel.as_posix(),
        "curve": val_curve(run_dir / "metrics.csv"),
    }


def val_curve(metrics_csv: Path) -> list[list[float]]:
    """``[[step, mean val top-1], ...]`` at every evaluation of a run (does training flatten out?)."""
    import csv

    if not metrics_csv.is_file():
        return []
    with metrics_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_mean_top1")]
    return [[int(r["step"]), float(r["val_mean_top1"])] for r in rows]
