"""From ``results.json`` to the table (``table.md``) and the plot (``plot.png``): means, stds, Delta_m.

Delta_m = 100 / T * sum_t (acc_t - acc_t^indep) / acc_t^indep, on per-task accuracies averaged over
seeds; its +/- is the std over seeds of the same formula with each seed paired with the independent
run of the same seed (same initial weights and data order).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

KIND_ORDER = {"shared": 0, "bn": 1, "top": 2, "bottom": 3, "independent": 4}


def delta_m(acc: Mapping[str, float], ref: Mapping[str, float]) -> float:
    """Mean relative accuracy change (in %) of ``acc`` against ``ref`` over ``ref``'s tasks."""
    return 100.0 / len(ref) * sum((acc[t] - ref[t]) / ref[t] for t in ref)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with the results."""
    import numpy
    import timm
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
        git = commit.stdout.strip() or None
    except OSError:
        git = None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git,
    }


def summarize(results: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per dataset, one row per plan: per-task mean/std, mean accuracy, proportion, Delta_m."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, ds in results["datasets"].items():
        runs = [r for r in results["runs"] if r["dataset"] == name]
        tasks = list(ds["tasks"])
        indep = {r["seed"]: r["acc"] for r in runs if r["plan"] == "independent"}
        indep_mean = {t: statistics.fmean(a[t] for a in indep.values()) for t in tasks} if indep else None
        rows = []
        for spec in ds["plans"]:
            mine = sorted((r for r in runs if r["plan"] == spec["plan"]), key=lambda r: r["seed"])
            if not mine:
                continue
            per_task = {t: mean_std([r["acc"][t] for r in mine]) for t in tasks}
            means = [statistics.fmean(r["acc"][t] for t in tasks) for r in mine]
            row = {
                **spec,
                "seeds": [r["seed"] for r in mine],
                "per_task": per_task,
                "mean": mean_std(means),
                "wall_s": statistics.fmean(r["wall_s"] for r in mine),
                "delta_m": None,
            }
            if indep_mean:
                dm = delta_m({t: per_task[t][0] for t in tasks}, indep_mean)
                paired = [delta_m(r["acc"], indep.get(r["seed"], indep_mean)) for r in mine]
                row["delta_m"] = (dm, mean_std(paired)[1])
            rows.append(row)
        out[name] = rows
    return out


def _load_preds(runs: Sequence[Mapping[str, Any]], root: Path | None) -> dict:
    """``{plan: {seed: {task: {"pred", "true", "files"}}}}`` for the runs whose npz is under ``root``."""
    from training.predictions import load_predictions

    out: dict = {}
    for r in runs:
        path = root / r["predictions"] if root is not None and r.get("predictions") else None
        if path is not None and path.is_file():
            out.setdefault(r["plan"], {})[r["seed"]] = load_predictions(path)
    return out


def paired_gaps(
    results: Mapping[str, Any], dataset: str, preds_root: Path | None = None
) -> list[dict[str, Any]]:
    """bottom minus top mean accuracy at each matched level, paired by seed: mean, std, per seed, the
    paired t-test over seeds and, with the runs' predictions under ``preds_root``, McNemar per task and
    the paired bootstrap CI (``training.experiment_stats``)."""
    from training.experiment_stats import level_stats, paired_t

    runs = [r for r in results["runs"] if r["dataset"] == dataset]
    preds = _load_preds(runs, preds_root)
    tasks = list(results["datasets"][dataset]["tasks"])
    plans = results["datasets"][dataset]["plans"]
    out = []
    for top in (p for p in plans if p["kind"] == "top"):
        bottom = next(
            p
            for p in plans
            if p["plan"] == top.get("match")
            or (p["kind"] == "bottom" and p["level"] == top["level"] and not top.get("match"))
        )
        by = {
            p: {r["seed"]: statistics.fmean(r["acc"].values()) for r in runs if r["plan"] == p}
            for p in (top["plan"], bottom["plan"])
        }
        seeds = sorted(set(by[top["plan"]]) & set(by[bottom["plan"]]))
        gaps = [by[bottom["plan"]][s] - by[top["plan"]][s] for s in seeds]
        if gaps:
            m, s = mean_std(gaps)
            out.append(
                {
                    "top": top["plan"],
                    "bottom": bottom["plan"],
                    "top_proportion": top["proportion"],
                    "bottom_proportion": bottom["proportion"],
                    "gap": m,
                    "gap_std": s,
                    "per_seed": gaps,
                    "bottom_wins": sum(g > 0 for g in gaps),
                    "seeds": seeds,
                    "ttest": paired_t(
                        [by[bottom["plan"]][s] for s in seeds], [by[top["plan"]][s] for s in seeds]
                    ),
                    "images": level_stats(preds, bottom["plan"], top["plan"], tasks),
                }
            )
    return out


def _pm(m: float, s: float, scale: float = 100.0, digits: int = 1) -> str:
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def table_markdown(results: Mapping[str, Any], preds_root: Path | None = None) -> str:
    """The markdown table: one section per dataset, then the matched-level gaps and their tests."""
    from training.experiment_stats import stats_markdown

    st = results["settings"]
    kwargs = f" `{json.dumps(st['timm_kwargs'])}`" if st["timm_kwargs"] else ""
    lines = [
        f"Backbone `{st['backbone']}`{kwargs} at {st['input_size']} px, {st['steps']} "
        f"steps x {st['batch_per_task']} images per task, AdamW lr {st['lr']}, seeds {st['seeds']}. "
        "Top-1 accuracy in % on each task's val split (mean ± std over seeds), final step."
    ]
    for name, rows in summarize(results).items():
        tasks = list(results["datasets"][name]["tasks"])
        lines += ["", f"### {name}", ""]
        lines.append("| plan | task-specific | " + " | ".join(tasks) + " | mean | Δm vs independent |")
        lines.append("| --- | --- |" + " --- |" * (len(tasks) + 2))
        for r in rows:
            label = r["plan"] + ("" if r["level"] is not None or r["kind"] != "bottom" else " (no top match)")
            dm = "" if r["delta_m"] is None else f"{r['delta_m'][0]:+.2f} ± {r['delta_m'][1]:.2f}"
            cells = [_pm(*r["per_task"][t]) for t in tasks]
            lines.append(
                f"| {label} | {r['proportion']:.1%} | "
                + " | ".join(cells)
                + f" | **{_pm(*r['mean'])}** | {dm} |"
            )
        gaps = paired_gaps(results, name, preds_root)
        if gaps:
            lines += [
                "",
                "| matched level | bottom − top mean accuracy (points, paired by seed) | bottom wins |",
                "| --- | --- | --- |",
            ]
            for g in gaps:
                lines.append(
                    f"| {g['bottom']} ({g['bottom_proportion']:.1%}) vs {g['top']} "
                    f"({g['top_proportion']:.1%}) | {_pm(g['gap'], g['gap_std'], digits=2)} | "
                    f"{g['bottom_wins']}/{len(g['seeds'])} seeds |"
                )
            lines += stats_markdown(gaps, tasks)
        lines += curve_markdown([r for r in results["runs"] if r["dataset"] == name])
    wall = sum(r["wall_s"] for r in results["runs"])
    lines += ["", f"{len(results['runs'])} runs, {wall / 60:.1f} min of training + evaluation in total."]
    return "\n".join(lines) + "\n"


def curve_markdown(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Mean val top-1 (over seeds) at each evaluation, per plan: does training flatten out?"""
    curves: dict[str, dict[int, list[float]]] = {}
    for r in runs:
        for step, acc in r.get("curve") or []:
            curves.setdefault(r["plan"], {}).setdefault(int(step), []).append(acc)
    steps = sorted({s for c in curves.values() for s in c})
    if len(steps) < 2:
        return []
    lines = [
        "",
        "| validation curve (mean top-1 %, mean over seeds) | "
        + " | ".join(f"step {s}" for s in steps)
        + " |",
    ]
    lines.append("| --- |" + " --- |" * len(steps))
    for plan, c in curves.items():
        cells = [f"{100 * statistics.fmean(c[s]):.1f}" if s in c else "" for s in steps]
        lines.append(f"| {plan} | " + " | ".join(cells) + " |")
    return lines


def plot_png(results: Mapping[str, Any], path: Path) -> None:
    """Mean accuracy against task-specific proportion, one line per plan kind, std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(results)
    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4.5), squeeze=False)
    styles = {"shared": "s", "bn": "o", "top": "v", "bottom": "^", "independent": "D"}
    for ax, (name, rows) in zip(axes[0], summary.items(), strict=True):
        for kind, marker in styles.items():
            pts = sorted((r["proportion"], *r["mean"]) for r in rows if r["kind"] == kind)
            if pts:
                x, y, e = zip(*pts, strict=True)
                plans = sorted((r["proportion"], r["plan"]) for r in rows if r["kind"] == kind)
                for (px, label), py in zip(plans, y, strict=True):
                    ax.annotate(
                        label, (100 * px, 100 * py), textcoords="offset points", xytext=(4, 4), fontsize=7
                    )
                ax.errorbar(
                    [100 * v for v in x],
                    [100 * v for v in y],
                    yerr=[100 * v for v in e],
                    marker=marker,
                    capsize=4,
                    label=kind,
                )
        ax.set(
            xlabel="task-specific parameters (% of the model)",
            ylabel="mean top-1 over tasks (%)",
            title=f"{name} ({len(results['datasets'][name]['tasks'])} tasks)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``table.md`` and ``plot.png`` next to ``results.json``."""
    table, plot = Path(out) / "table.md", Path(out) / "plot.png"
    table.write_text(table_markdown(results, Path(out)))
    plot_png(results, plot)
    return table, plot
