"""Training the new task's own variants on the frozen trunk: every other parameter has
``requires_grad=False`` and every other module stays in eval mode (BatchNorm statistics of shared
segments do not move); the best step by val top-1 is kept."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from models.network import MultiTaskNet
from training.add_task_config import AddTaskConfig
from training.config import OptimizerConfig
from training.imagefolder import MixedBatchSampler, MixedDataset, TaskData, eval_batches, make_loader


@torch.no_grad()
def evaluate_task(net: MultiTaskNet, task: str, loader, device) -> dict[str, float]:
    hits1 = hits5 = count = 0
    for x, y, _t, _bad in loader:
        logits = net.forward_task(x.to(device), task).float().cpu()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        hits1 += int(hit[:, 0].sum())
        hits5 += int(hit.any(1).sum())
        count += len(y)
    out = {"top1": hits1 / max(count, 1)}
    if net.num_classes[task] >= 5:
        out["top5"] = hits5 / max(count, 1)
    return out


def _set_trainable(net: MultiTaskNet, modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    net.eval()  # frozen segments: BatchNorm uses (and keeps) its running statistics
    for p in net.parameters():
        p.requires_grad_(False)
    params = []
    for m in modules:
        m.train()
        for p in m.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def _scheduler(opt, steps: int, warmup: int, min_ratio: float):
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    warmup = min(warmup, steps - 1)
    cosine = CosineAnnealingLR(
        opt, T_max=max(steps - warmup, 1), eta_min=opt.param_groups[0]["lr"] * min_ratio
    )
    if warmup <= 0:
        return cosine
    return SequentialLR(opt, [LinearLR(opt, 1e-3, 1.0, total_iters=warmup), cosine], milestones=[warmup])


def _loaders(data: TaskData, train_tf: Callable, eval_tf: Callable, cfg: AddTaskConfig, cuda: bool):
    """The endless train loader and the val loader of the new task."""
    sampler = MixedBatchSampler([len(data.train)], cfg.batch_size, cfg.seed)
    loader = make_loader(MixedDataset([data.train], train_tf), sampler, cfg.workers, cfg.seed, cuda)
    val_loader = make_loader(
        MixedDataset([data.val], eval_tf), eval_batches([len(data.val)], cfg.eval_batch_size), 0, 0, cuda
    )
    return loader, val_loader


def _validate(net: MultiTaskNet, task: str, modules: Sequence[nn.Module], loader, device) -> dict[str, float]:
    for m in modules:
        m.eval()
    val = evaluate_task(net, task, loader, device)
    for m in modules:
        m.train()
    return val


def _keep_best(net: MultiTaskNet, modules: Sequence[nn.Module], states: Sequence[dict]) -> None:
    """Load the best step's weights into the new modules and freeze the whole network (eval mode)."""
    for m, state in zip(modules, states, strict=True):
        m.load_state_dict(state)
    for m in modules:
        m.eval()
    for p in net.parameters():
        p.requires_grad_(False)


def train_new_task(
    net: MultiTaskNet,
    task: str,
    modules: Sequence[nn.Module],
    data: TaskData,
    transforms: tuple[Callable, Callable],
    cfg: AddTaskConfig,
    optimizer: OptimizerConfig,
    device: torch.device,
    progress: bool,
    say: Callable[[str], None],
) -> tuple[dict[str, float], int]:
    """Train the new modules on the task's train split; keep the best by val top-1. Returns (val, step)."""
    params = _set_trainable(net, modules)
    net.to(device)
    opt = torch.optim.AdamW(
        params, lr=optimizer.lr, betas=optimizer.betas, weight_decay=optimizer.weight_decay
    )
    sched = _scheduler(opt, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
    loader, val_loader = _loaders(data, *transforms, cfg, device.type == "cuda")
    interval = cfg.eval_interval or max(cfg.steps // 4, 1)
    best: tuple[float, int, list[dict]] | None = None
    val: dict[str, float] = {}
    bar = tqdm(total=cfg.steps, disable=not progress, mininterval=1.0, file=sys.stderr, desc=f"add {task}")
    it = iter(loader)
    loss_sum, seen = 0.0, 0
    for step in range(1, cfg.steps + 1):
        x, y, _t, _bad = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = nn.functional.cross_entropy(net.forward_task(x, task), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum, seen = loss_sum + float(loss.detach()), seen + 1
        bar.update()
        if step % interval == 0 or step == cfg.steps:
            val = _validate(net, task, modules, val_loader, device)
            if best is None or val["top1"] > best[0]:
                best = (val["top1"], step, [copy.deepcopy(m.state_dict()) for m in modules])
            bar.set_postfix({"loss": f"{loss_sum / seen:.3f}", "val": f"{val['top1']:.3f}"}, refresh=False)
            if not progress:
                say(f"  step {step}/{cfg.steps}: loss {loss_sum / seen:.3f}, val top-1 {val['top1']:.4f}")
            loss_sum, seen = 0.0, 0
    bar.close()
    assert best is not None
    _keep_best(net, modules, best[2])
    if best[1] != cfg.steps:
        val = evaluate_task(net, task, val_loader, device)
    return val, best[1]
