"""``mtserve experiment add-task``: how close does an added task get to joint training?

On the multi-domain benchmark, for each domain d (leave-one-out) and seed: train the plan on the
other domains, add d with add-task (its own variants on the frozen trunk, in memory: no export), and
compare d's val top-1 with (a) the same plan trained jointly on all domains and (b) an independent
model trained on d alone (the whole backbone). Also the task-specific share of the added task:
its own parameters over the parameters of the extended model. Every finished run is appended to
``results.json`` at once (an interrupted experiment resumes); ``table.md`` and ``plot.png`` follow.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from training.experiment_options import add_run_options, with_run_settings

RESULTS = "results.json"
QUICK = {"steps": 3, "seeds": 1, "max_train_per_class": 8, "max_val_per_class": 4, "batch_per_task": 4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="multi-domain root (mtserve data mdb)")
    parser.add_argument(
        "--out", type=Path, required=True, help="results folder: results.json, table.md, plot.png"
    )
    parser.add_argument("--domains", help="comma-separated domains to hold out (default: all)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
    parser.add_argument(
        "--steps", type=int, default=300, help="steps per training run and per add (default 300)"
    )
    parser.add_argument(
        "--batch-per-task", type=int, default=16, help="images per task per step (default 16)"
    )
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--backbone", default="resnet34")
    parser.add_argument(
        "--timm-kwargs",
        default='{"channels": [16, 32, 64, 128], "stem_width": 16}',
        help="JSON timm.create_model kwargs (default: quarter-width ResNet, as experiment paper)",
    )
    parser.add_argument("--plan", default="bottom:2", help="the sharing plan (default bottom:2)")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument(
        "--init", choices=["stem", "scratch"], default=None, help="add-task init (default: its)"
    )
    add_run_options(parser)
    parser.add_argument("--work", type=Path, help="run directories (default runs/experiment-<out>)")
    parser.add_argument("--quick", action="store_true", help="seconds: 3 steps, 1 seed, 8/4 images per class")


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    s = {
        "plan": args.plan,
        "seeds": args.seeds,
        "init": args.init,
    }
    return with_run_settings(s, args, QUICK)


class Results:
    def __init__(self, path: Path, settings: Mapping[str, Any], command: str):
        self.path = path
        if path.is_file():
            self.data = json.loads(path.read_text())
            if self.data.get("settings") != dict(settings):
                raise ValueError(f"{path} was made with other settings; use another --out or delete it")
        else:
            self.data = {"settings": dict(settings), "command": command, "runs": []}

    def find(self, kind: str, domain: str, seed: int) -> dict | None:
        return next(
            (r for r in self.data["runs"] if (r["kind"], r["domain"], r["seed"]) == (kind, domain, seed)),
            None,
        )

    def add(self, row: dict) -> None:
        self.data["runs"].append(row)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)


def _once(results: Results, say, kind: str, domain: str, seed: int, make: Callable[[], dict]) -> dict:
    """The recorded row of one run, else run it (``make``) and record it at once."""
    row = results.find(kind, domain, seed)
    if row is None:
        say(f"[{kind} {domain} seed {seed}]")
        row = {"kind": kind, "domain": domain, "seed": seed, **make()}
        results.add(row)
    return row


def _train(
    data: Path, tasks: list[str], plan: str, seed: int, settings: Mapping[str, Any], run_dir: Path, say
):
    from training.experiment import train_config, train_one

    return train_one(train_config(data, tasks, plan, seed, settings), run_dir, say)


def _add_task_config(settings: Mapping[str, Any], seed: int):
    from training.add_task_config import AddTaskConfig
    from training.config import OptimizerConfig

    opt = OptimizerConfig(lr=settings["lr"], weight_decay=settings["weight_decay"])
    return AddTaskConfig(
        steps=settings["steps"],
        warmup_steps=settings["warmup_steps"],
        batch_size=settings["batch_per_task"],
        eval_interval=settings["steps"],  # one evaluation at the end, like the runs
        optimizer=opt,
        seed=seed,
        workers=settings["workers"],
        device=settings["device"],
        **({"init": settings["init"]} if settings["init"] else {}),
    )


def added_run(
    data: Path, d: str, others: list[str], seed: int, settings: Mapping[str, Any], work: Path, say
) -> dict:
    """Train the plan on ``others``, then add ``d`` to it in memory (add-task without export)."""
    from training.add_task import extend_network
    from training.add_task_network import load_net

    run_dir = work / f"without-{d}-s{seed}"
    base = _train(data, others, settings["plan"], seed, settings, run_dir, say)
    net, run_cfg = load_net(run_dir / "config.json", run_dir / "best.safetensors")
    cfg = _add_task_config(settings, seed)
    t0 = time.perf_counter()
    ext = extend_network(net, run_cfg, d, data / d, cfg, say=lambda *_: None)
    total = sum(p.numel() for p in net.parameters())
    acc = net.accounting()
    say(f"    added {d}: top-1 {ext.val['top1']:.4f}, own share {ext.trainable / total:.2%}")
    return {
        "acc": {d: ext.val["top1"]},
        "base_acc": base["acc"],
        "donor": ext.donor,
        "own_params": ext.trainable,
        "total_params": total,
        "share": ext.trainable / total,
        "model_task_specific_proportion": acc.proportion,
        "wall_s": time.perf_counter() - t0,
        "base_wall_s": base["wall_s"],
    }


def run_experiment(
    data: Path,
    out: Path,
    settings: Mapping[str, Any],
    domains: list[str] | None,
    work: Path,
    command: str,
    say,
) -> dict:
    import torch

    from training.experiment import count_classes, subset_data

    torch.set_num_threads(int(settings["threads"]))
    all_domains = list(count_classes(data))
    held = domains or all_domains
    unknown = sorted(set(held) - set(all_domains))
    if unknown:
        raise ValueError(f"--domains: unknown {unknown}; the data has {all_domains}")
    data = subset_data(data, work / "data", settings["max_train_per_class"], settings["max_val_per_class"])
    results = Results(out / RESULTS, settings, command)
    plan = settings["plan"]
    for seed in range(int(settings["seeds"])):
        joint = partial(_train, data, all_domains, plan, seed, settings, work / f"joint-s{seed}", say)
        _once(results, say, "joint", "*", seed, joint)
        for d in held:
            others = [t for t in all_domains if t != d]
            run_dir = work / f"independent-{d}-s{seed}"
            _once(
                results,
                say,
                "independent",
                d,
                seed,
                partial(_train, data, [d], "shared", seed, settings, run_dir, say),
            )
            _once(
                results, say, "added", d, seed, partial(added_run, data, d, others, seed, settings, work, say)
            )
    return results.data


def summarize(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per held-out domain: mean top-1 of added / joint / independent over seeds, gaps, share."""
    runs = data["runs"]
    domains = sorted({r["domain"] for r in runs if r["kind"] == "added"})
    rows = []
    for d in domains:

        def mean(values):
            values = list(values)
            return sum(values) / len(values) if values else float("nan")

        added = [r for r in runs if r["kind"] == "added" and r["domain"] == d]
        seeds = {r["seed"] for r in added}
        joint = mean(r["acc"][d] for r in runs if r["kind"] == "joint" and r["seed"] in seeds)
        indep = mean(r["acc"][d] for r in runs if r["kind"] == "independent" and r["domain"] == d)
        a = mean(r["acc"][d] for r in added)
        rows.append({
            "domain": d, "seeds": len(seeds), "added": a, "joint": joint, "independent": indep,
            "added_minus_joint": a - joint, "added_minus_independent": a - indep,
            "share": mean(r["share"] for r in added), "donors": sorted({r["donor"] for r in added}),
        })  # fmt: skip
    return rows


def table_markdown(data: Mapping[str, Any]) -> str:
    rows = summarize(data)
    lines = [
        "| held-out domain | added (frozen trunk) | joint | independent | added - joint | "
        "added - independent | task-specific share | stem from |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['domain']} | {100 * r['added']:.1f} | {100 * r['joint']:.1f} "
            f"| {100 * r['independent']:.1f} "
            f"| {100 * r['added_minus_joint']:+.1f} | {100 * r['added_minus_independent']:+.1f} "
            f"| {100 * r['share']:.2f}% | {', '.join(r['donors'])} |"
        )
    if rows:
        n = len(rows)
        lines.append(
            f"| **mean** | {100 * sum(r['added'] for r in rows) / n:.1f} "
            f"| {100 * sum(r['joint'] for r in rows) / n:.1f} "
            f"| {100 * sum(r['independent'] for r in rows) / n:.1f} "
            f"| {100 * sum(r['added_minus_joint'] for r in rows) / n:+.1f} "
            f"| {100 * sum(r['added_minus_independent'] for r in rows) / n:+.1f} "
            f"| {100 * sum(r['share'] for r in rows) / n:.2f}% | |"
        )
    s = data["settings"]
    quick = " (QUICK: a smoke run, not a measurement)" if s.get("quick") else ""
    lines.append(
        f"\nval top-1 (%), {s['backbone']} {s['plan']}, {s['steps']} steps x {s['batch_per_task']} "
        f"images per task, seeds {s['seeds']}{quick}. "
        f"Command: `{data.get('command', '')}`"
    )
    return "\n".join(lines) + "\n"


def plot_png(data: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(data)
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 3.5))
    width = 0.27
    for k, (key, label) in enumerate(
        (("added", "added (frozen trunk)"), ("joint", "joint"), ("independent", "independent"))
    ):
        ax.bar([i + (k - 1) * width for i in range(len(rows))], [r[key] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [r["domain"] for r in rows])
    ax.set(
        ylabel="val top-1", ylim=(0, 1), title="leave-one-out: a domain added to a trunk trained without it"
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def command_line(args: argparse.Namespace) -> str:
    parts = ["mtserve", "experiment", "add-task", "--data", str(args.data), "--out", str(args.out)]
    for flag in ("domains", "seeds", "steps", "batch_per_task", "lr", "backbone", "timm_kwargs", "plan",
                 "input_size", "init", "max_train_per_class", "max_val_per_class", "threads", "workers",
                 "device", "work"):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            parts += ["--" + flag.replace("_", "-"), str(value)]
    return shlex.join(parts + (["--quick"] if args.quick else []))


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    work = args.work or Path("runs") / f"experiment-{args.out.name}"
    start = time.perf_counter()
    data = run_experiment(
        args.data, args.out, settings, domains, work, command_line(args),
        say=lambda m: print(m, file=sys.stderr, flush=True),
    )  # fmt: skip
    table = args.out / "table.md"
    table.write_text(table_markdown(data))
    plot_png(data, args.out / "plot.png")
    print(table.read_text())
    print(
        f"wrote {args.out / RESULTS}, {table}, {args.out / 'plot.png'} in {time.perf_counter() - start:.0f} s"
    )
    return 0
