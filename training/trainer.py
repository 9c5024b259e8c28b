"""The training loop: one batch from every task per step, concatenated, through ``MultiTaskNet``.

Loss = sum over tasks of weight * mean cross-entropy. AdamW, linear warm-up then cosine. AMP and
channels_last on CUDA. DDP under ``torchrun`` (gloo on CPU, nccl on CUDA); only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.network import MultiTaskNet
from training import run_files
from training.imagefolder import MixedBatchSampler, MixedDataset, eval_batches, load_task, make_loader
from training.metrics_log import MetricsLog
from training.optimizer_state import STATE, load_state, save_state
from training.run_files import RunConfig
from training.run_setup import build_run, pick_device

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val: dict[str, dict[str, float]]  # task -> {"top1", "top5"?}
    best: dict | None
    images_per_s: float
    wall_s: float
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """``torch.distributed`` from torchrun's environment when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(net: MultiTaskNet, loader, device, amp, dist: Dist) -> dict[str, dict[str, float]]:
    """Per-task top-1 (and top-5 where a task has >= 5 classes) over this rank's val shard, reduced."""
    was_training = net.training
    net.eval()
    n = len(net.task_names)
    sums = torch.zeros(3, n, dtype=torch.float64)  # top1, top5, count
    for x, y, t, _bad in loader:
        task = int(t[0])
        with amp():
            logits = net.forward_task(x.to(device, non_blocking=True), net.task_names[task]).float().cpu()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        sums[:, task] += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(), len(y)])
    if dist.world > 1:
        torch.distributed.all_reduce(sums)
    net.train(was_training)
    out = {}
    for i, name in enumerate(net.task_names):
        count = max(sums[2, i].item(), 1)
        out[name] = {"top1": sums[0, i].item() / count}
        if net.num_classes[name] >= 5:
            out[name]["top5"] = sums[1, i].item() / count
    return out


def make_scheduler(opt, steps: int, warmup: int, min_ratio: float):
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    eta_min = opt.param_groups[0]["lr"] * min_ratio
    cosine = CosineAnnealingLR(opt, T_max=max(steps - warmup, 1), eta_min=eta_min)
    if not warmup:
        return cosine
    return SequentialLR(opt, [LinearLR(opt, 1e-3, 1.0, total_iters=warmup), cosine], milestones=[warmup])


class _Session:
    """Everything one run holds: device, model, optimiser, schedule, data, bookkeeping."""

    def __init__(self, cfg, run_dir: Path, max_steps, resume, pretrained, overwrite, say):
        self.cfg, self.run_dir, self.device = cfg, run_dir, pick_device(cfg.device)
        self.dist = dist = init_distributed(self.device.type)
        cuda = self.device.type == "cuda"
        if cuda and dist.world > 1:
            self.device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(self.device)
        _check_run_dir(run_dir, resume, overwrite, dist.main)
        seed_everything(cfg.seed)
        data = [load_task(name, task.root) for name, task in cfg.tasks.items()]
        run = build_run(cfg, data, pretrained=False if resume else pretrained)
        self.net = net = run.net
        self.run_config = run.config
        seed_everything(cfg.seed + dist.rank)
        use_amp = cuda and cfg.amp != "off"
        self.amp = (
            (lambda: torch.autocast("cuda", AMP_DTYPES[cfg.amp])) if use_amp else contextlib.nullcontext
        )
        self.fmt = torch.channels_last if cuda and cfg.channels_last else torch.contiguous_format
        net.to(self.device, memory_format=self.fmt)
        o, sc = cfg.optimizer, cfg.schedule
        self.opt = torch.optim.AdamW(
            net.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=cuda or None
        )
        self.sched = make_scheduler(self.opt, sc.steps, sc.warmup_steps, sc.min_lr_ratio)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.amp == "fp16")
        self.start, self.best = 0, None
        if resume:
            _check_resume(run_dir, run.config)
            net.load_state_dict(run_files.load_weights(run_dir, "last"))
            saved = load_state(run_dir, self.opt, self.sched, self.scaler)
            self.start, self.best = int(saved["step"]), saved.get("best")
            say(f"resuming {run_dir} from step {self.start}")
        self.end = min(sc.steps, max_steps) if max_steps else sc.steps
        self.model = net
        if dist.world > 1:
            ids = [self.device.index] if cuda else None
            self.model = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
        sizes = [len(d.train) for d in data]
        sampler = MixedBatchSampler(sizes, cfg.batch_per_task, cfg.seed, dist.rank, dist.world, self.start)
        self.train_set = MixedDataset([d.train for d in data], run.train_tf)
        self.loader = make_loader(self.train_set, sampler, cfg.workers, cfg.seed + dist.rank, cuda)
        batches = eval_batches([len(d.val) for d in data], cfg.eval_batch_size, dist.rank, dist.world)
        val_set = MixedDataset([d.val for d in data], run.eval_tf)
        self.val_loader = make_loader(val_set, batches, cfg.workers, 0, cuda)
        metrics = run_dir / "metrics.csv"
        self.log = MetricsLog(metrics, net.task_names, net.num_classes, self.start) if dist.main else None


def train(
    cfg,
    run_dir: Path,
    *,
    max_steps: int | None = None,
    resume: bool = False,
    pretrained: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    say=print,
) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; returns the final validation accuracy and throughput."""
    wall0 = time.perf_counter()
    main = int(os.environ.get("RANK", "0")) == 0
    say = say if main else (lambda *a, **k: None)
    s = _Session(cfg, Path(run_dir), max_steps, resume, pretrained, overwrite, say)
    net, names = s.net, s.net.task_names
    acc, T = net.accounting(), len(names)
    say(
        f"training {cfg.backbone} plan {s.run_config.plan!r} on {s.device} x{s.dist.world} into {s.run_dir}: "
        f"steps {s.start}->{s.end}, {T} tasks x {cfg.batch_per_task} images per step\n"
        f"parameters: total {acc.total_params:,}, task-specific {acc.task_specific_params:,} "
        f"({acc.proportion:.1%}); {acc.bytes_held / 2**20:.1f} MiB vs "
        f"{acc.bytes_independent / 2**20:.1f} MiB for {T} independent models"
    )
    bar = tqdm(
        total=s.end, initial=s.start, disable=not (progress and s.dist.main), mininterval=1.0, file=sys.stderr
    )
    val, windows, bad = _loop(s, cfg, bar)
    bar.close()
    if val is None:  # nothing left to train (resumed at the end): evaluate what is there
        val = evaluate(net, s.val_loader, s.device, s.amp, s.dist)
    if s.log:
        s.log.plot(s.run_dir / "curves.png", names)
    if s.dist.world > 1:
        torch.distributed.barrier()
    steady = windows[1:] or windows  # the first window includes DataLoader start-up
    rate = sum(n for n, _ in steady) / max(sum(e for _, e in steady), 1e-9)
    wall = time.perf_counter() - wall0
    return TrainResult(s.run_dir, s.end, val, s.best, rate, wall, _bad_counts(bad, s.train_set, names))


def _step(s: _Session, x, y, t, weights: torch.Tensor) -> torch.Tensor:
    """One optimiser step on a mixed batch; returns the mean loss per task (detached)."""
    T, B = len(s.net.task_names), s.cfg.batch_per_task
    x = x.to(s.device, non_blocking=True, memory_format=s.fmt)
    y = y.to(s.device, non_blocking=True)
    with s.amp():
        logits = s.model(x, t.tolist())
    per_task = F.cross_entropy(logits.float(), y, reduction="none").view(T, B).mean(1)
    loss = (per_task * weights).sum()
    s.opt.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.step(s.opt)
    s.scaler.update()
    s.sched.step()
    return per_task.detach()


def _loop(s: _Session, cfg, bar) -> tuple[dict | None, list[tuple[int, float]], set[int]]:
    """Steps ``start+1..end``: log every ``log_interval``, evaluate (and save) every ``eval_interval``.
    Returns the last validation, the (images, seconds) of each log window and the unreadable images."""
    names, B, T = s.net.task_names, cfg.batch_per_task, len(s.net.task_names)
    weights = torch.tensor(cfg.task_weights, device=s.device)
    loss_sum, seen, windows = torch.zeros(T, device=s.device), 0, []
    bad: set[int] = set()
    val, it, tick = None, iter(s.loader), time.perf_counter()
    s.model.train()
    for step in range(s.start + 1, s.end + 1):
        x, y, t, b = next(it)
        if b.max() >= 0:
            bad.update(b[b >= 0].tolist())
        loss_sum += _step(s, x, y, t, weights)
        seen += 1
        bar.update()
        do_eval = step % cfg.eval_interval == 0 or step == s.end
        if step % cfg.log_interval and not do_eval:
            continue
        elapsed = time.perf_counter() - tick
        n_img = seen * B * T * s.dist.world
        windows.append((n_img, elapsed))
        losses = (loss_sum / seen).tolist()
        total = sum(w * v for w, v in zip(cfg.task_weights, losses, strict=True))
        loss_sum.zero_()
        seen = 0
        row = {"step": step, "lr": f"{s.sched.get_last_lr()[0]:.6g}", "loss": f"{total:.5f}"}
        row |= {f"loss_{n}": f"{v:.5f}" for n, v in zip(names, losses, strict=True)}
        row["images_per_s"] = f"{n_img / max(elapsed, 1e-9):.1f}"
        post = {"loss": f"{total:.3f}", "img_s": f"{n_img / max(elapsed, 1e-9):.0f}"}
        if do_eval:
            val = evaluate(s.net, s.val_loader, s.device, s.amp, s.dist)
            _record_eval(s, step, val, row, post)
            if bad and s.dist.main:
                counts = _bad_counts(bad, s.train_set, names)
                bar.write(
                    f"warning: skipped {len(bad)} unreadable training image(s) so far: {counts}",
                    file=sys.stderr,
                )
        bar.set_postfix(post, refresh=False)
        if s.log:
            s.log.write(row)
        tick = time.perf_counter()
    return val, windows, bad


def _record_eval(s: _Session, step: int, val: dict, row: dict, post: dict) -> None:
    """Add val accuracy to the metrics row; on rank 0 save best (by mean top-1) and last."""
    mean = sum(v["top1"] for v in val.values()) / len(val)
    row |= {f"val_{k}_{n}": f"{a:.4f}" for n, v in val.items() for k, a in v.items()}
    row["val_mean_top1"] = f"{mean:.4f}"
    post["val"] = f"{mean:.3f}"
    if s.best is None or mean > s.best["mean_top1"]:
        s.best = {"step": step, "mean_top1": mean, "val": {n: v["top1"] for n, v in val.items()}}
        if s.dist.main:
            run_files.save_weights(s.run_dir, "best", s.net)
    if s.dist.main:
        _save_last(s.run_dir, s.net, s.opt, s.sched, s.scaler, s.run_config, step, s.best)


def _save_last(run_dir, net, opt, sched, scaler, config: RunConfig, step, best) -> None:
    run_files.save_weights(run_dir, "last", net)
    save_state(run_dir, opt, sched, scaler, {"step": step, "best": best})
    run_files.write_config(run_dir, config, step, best and {"step": best["step"], "val": best["val"]})


def _bad_counts(bad: set[int], dataset: MixedDataset, names: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in bad:
        name = names[int(dataset.task_of[i])]
        counts[name] = counts.get(name, 0) + 1
    return counts


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool, main: bool) -> None:
    if resume:
        if not (run_dir / STATE).is_file() or not (run_dir / run_files.WEIGHTS["last"]).is_file():
            raise FileNotFoundError(f"cannot resume: {run_dir} has no last.safetensors + state.json")
    elif run_files.has_checkpoint(run_dir) and not overwrite:
        raise ValueError(
            f"{run_dir} already holds a training run; pass --resume to continue it or --overwrite"
        )
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)


def _check_resume(run_dir: Path, config: RunConfig) -> None:
    saved = run_files.read_run_config(run_dir)
    for key in ("backbone", "plan", "tasks", "timm_kwargs"):
        if getattr(saved, key) != getattr(config, key):
            raise ValueError(f"cannot resume {run_dir}: the config's {key} differs from the saved run's")
