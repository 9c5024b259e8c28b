"""Benchmark: `mtserve train` images/s vs a plain hand-written torch loop on the same mixed batches.

Both sides use the same MultiTaskNet, the same data (one batch of every task per step, one DataLoader
with the same workers), the same AdamW; the plain loop is ``loss.backward(); opt.step()`` and nothing
else (no schedule, no per-task loss bookkeeping, no logging, no progress bar, no checkpoints).
Steady-state images/s: the first ``--warmup`` steps of each side are not timed.

With ``--out DIR`` the figure (P6) goes into the bench results folder with the machine (CPU, cores,
load averages before and after, versions): ``DIR/train.json`` + ``DIR/train.md``.

    .venv/bin/python scripts/bench_train.py --config training/configs/demo.yaml --steps 120
    .venv/bin/python scripts/bench_train.py --out results/bench     # P6 into the bench results
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_loop(cfg, steps: int, warmup: int) -> float:
    import torch
    import torch.nn.functional as F

    from training.imagefolder import MixedBatchSampler, MixedDataset, load_task, make_loader
    from training.run_setup import build_run, pick_device

    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    data = [load_task(n, t.root) for n, t in cfg.tasks.items()]
    run = build_run(cfg, data)
    net = run.net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    sampler = MixedBatchSampler([len(d.train) for d in data], cfg.batch_per_task, cfg.seed)
    loader = make_loader(MixedDataset([d.train for d in data], run.train_tf), sampler, cfg.workers, 0, False)
    n = 0
    for i, (x, y, t, _) in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        if i == warmup + steps:
            break
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(net(x, t), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(y) if i >= warmup else 0
    return n / (time.perf_counter() - start)


def trainer(cfg, steps: int, warmup: int) -> float:
    from training.trainer import train

    # one timed window after a warm-up window; evaluation happens only after the last step (untimed)
    cfg = cfg.model_copy(update={"log_interval": warmup, "eval_interval": 10**9})
    cfg = cfg.model_copy(update={"schedule": cfg.schedule.model_copy(update={"steps": warmup + steps})})
    with tempfile.TemporaryDirectory() as tmp:
        result = train(cfg, Path(tmp) / "run", progress=True, say=lambda *_: None)
    return result.images_per_s


def measure(args) -> dict:
    """Both sides, alternating ``--repeats`` times; the best of each and their ratio."""
    import torch

    from training.config import load_config

    cfg = load_config(args.config)
    runs: dict[str, list[float]] = {"trainer": [], "plain": []}
    for _ in range(args.repeats):  # alternate so that background load hits both sides alike
        runs["trainer"].append(trainer(cfg, args.steps, args.warmup))
        runs["plain"].append(plain_loop(cfg, args.steps, args.warmup))
        print(f"trainer {runs['trainer'][-1]:.1f} images/s, plain loop {runs['plain'][-1]:.1f} images/s")
    best = {k: max(v) for k, v in runs.items()}
    return {
        "config": args.config,
        "backbone": cfg.backbone,
        "plan": cfg.plan if isinstance(cfg.plan, str) else str(cfg.plan),
        "batch": {"per_task": cfg.batch_per_task, "tasks": len(cfg.tasks)},
        "workers": cfg.workers,
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
        "runs": runs,
        "trainer_images_per_s": best["trainer"],
        "plain_images_per_s": best["plain"],
        "ratio": best["trainer"] / best["plain"],
    }


def record(out: Path, result: dict, before: dict, after: dict) -> None:
    """P6 into the bench results folder: ``train.json`` (with the machine) and ``train.md``."""
    out.mkdir(parents=True, exist_ok=True)
    head = {"scenario": "train", "title": "P6 trainer images/s vs a plain torch loop", "command": sys.argv}
    rec = head | {"machine": before, "loadavg_after": after["loadavg"], **result}
    (out / "train.json").write_text(json.dumps(rec, indent=2) + "\n")
    (out / "train.md").write_text(
        f"### P6 trainer\n\n| trainer images/s | plain loop images/s | ratio |\n| --- | --- | --- |\n"
        f"| {result['trainer_images_per_s']:.1f} | {result['plain_images_per_s']:.1f} "
        f"| {result['ratio']:.3f} |\n"
        f"\n_{before['cpu_model']}, {before['usable_cpus']} CPUs, load average {before['loadavg']} before, "
        f"{after['loadavg']} after; {result['config']} ({result['backbone']}, {result['plan']})._\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="training/configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=120, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two sides this many times")
    parser.add_argument("--json", default="bench_train.json", help="where to write the results")
    parser.add_argument("--out", type=Path, help="also record P6 as OUT/train.json + train.md")
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (the trainer logs every --warmup steps)")
    from service.bench.machine import describe

    before = describe()
    result = measure(args)
    Path(args.json).write_text(json.dumps(result, indent=2))
    ratio, repeats = result["ratio"], args.repeats
    print(f"ratio trainer/plain = {ratio:.3f} (best of {repeats}; target >= 0.9) -> {args.json}")
    if args.out:
        record(args.out, result, before, describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
