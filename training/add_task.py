"""Add a task to a trained bundle: train only its own variants on the frozen shared segments.

The bundle's checkpoint and config rebuild the torch network. The new task gets its own variant of
every task-specific segment (the stem and the head for ``bottom:K``; ``own`` = K units from the
bottom when the plan's segment boundaries allow) and uses the existing variants elsewhere. Only the
new variants train: every other parameter has ``requires_grad=False`` and every other module stays
in eval mode, so BatchNorm statistics of shared segments do not move either. The other tasks'
parameters and logits are checked bit for bit after training. Only the new variants are exported
(ONNX, parity-checked against torch like ``mtserve export``); every other file is copied byte for
byte, so a server reloading the new version reuses the sessions of those files.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from contract.bundle import sha256_file
from contract.errors import UserError
from contract.manifest import Manifest, TaskSpec, VariantSpec
from contract.plan import HEAD, SegmentPlan
from models.backbone import create_backbone, split_model
from models.network import MultiTaskNet
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
    write_json,
)
from training.config import AugmentConfig, OptimizerConfig
from training.export import PARITY_BATCHES, check_parity, export_module
from training.imagefolder import (
    MixedBatchSampler,
    MixedDataset,
    TaskData,
    eval_batches,
    load_image,
    load_task,
    make_loader,
    transforms,
)

Init = Literal["stem", "scratch"]
# Measured on the demo (results/add-task/README.md): Fashion-MNIST added to the 3-task demo bundle,
# 3 seeds, val top-1 from a trained stem vs from scratch: 0.758 vs 0.727 at 100 steps, 0.798 vs
# 0.793 at 300; better at every seed.
DEFAULT_INIT: Init = "stem"


class AddTaskConfig(BaseModel):
    """How the new task trains: ``mtserve train``'s vocabulary (optimizer, schedule, augment, batch,
    eval, seed, device, workers) plus what adding needs (own, init, init_from). Unset optimizer and
    augment fields come from the bundle's own training config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: Annotated[int, Field(ge=1)] = 300
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.01
    optimizer: OptimizerConfig | None = None
    augment: AugmentConfig | None = None
    batch_size: Annotated[int, Field(ge=1)] = 64
    eval_batch_size: Annotated[int, Field(ge=1)] = 256
    eval_interval: Annotated[int, Field(ge=1)] | None = None  # default: 4 evaluations
    own: Annotated[int, Field(ge=0)] | None = None  # units owned from the bottom; None: the plan's
    init: Init = DEFAULT_INIT
    init_from: str | None = None  # the task whose variants start the new ones; None: probed
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    workers: Annotated[int, Field(ge=0)] = 1
    threads: Annotated[int, Field(ge=1)] | None = None


@dataclass
class AddTaskResult:
    out: Path
    manifest: Manifest
    task: str
    val: dict[str, float]
    best_step: int
    donor: str | None
    probe: dict[str, float]
    owned: list[str]
    new_files: dict[str, int]  # file -> bytes
    unchanged_files: int
    trainable_params: int
    others_bit_identical: bool
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        acc = self.manifest.accounting
        return {
            "task": self.task,
            "bundle": str(self.out),
            "version": self.manifest.version,
            "val": self.val,
            "best_step": self.best_step,
            "init_from": self.donor,
            "donor_probe": self.probe,
            "owned_segments": self.owned,
            "new_files": self.new_files,
            "unchanged_files": self.unchanged_files,
            "trainable_params": self.trainable_params,
            "task_specific_share": self.trainable_params / acc.total_params if acc else None,
            "accounting": acc.model_dump() if acc else None,
            "others_bit_identical": self.others_bit_identical,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


# -- the network ---------------------------------------------------------------------------------


def load_net(cfg_path: Path, weights: Path) -> tuple[MultiTaskNet, dict[str, Any]]:
    """A network from a config.json (a run's or a bundle's) and its safetensors weights, eval mode."""
    cfg = json.loads(cfg_path.read_text())
    labels = {t: list(v["labels"]) for t, v in cfg["tasks"].items()}
    net = MultiTaskNet(
        cfg["backbone"], {t: len(v) for t, v in labels.items()}, cfg["plan"], **(cfg.get("timm_kwargs") or {})
    )
    net.load_state_dict(load_file(str(weights)), strict=True)
    return net.eval(), cfg


def load_bundle_net(source: Path, manifest: Manifest) -> tuple[MultiTaskNet, dict[str, Any]]:
    """The torch network of a bundle (its checkpoint and config), checked against its manifest."""
    cfg_path, weights = source / CONFIG, source / CHECKPOINT
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(
            f"{source} has no {CONFIG} + {CHECKPOINT}: add-task needs the torch side of the bundle "
            "(mtserve export copies both from the training run)"
        )
    cfg = json.loads(cfg_path.read_text())
    labels = {t: list(v["labels"]) for t, v in cfg["tasks"].items()}
    if list(labels) != list(manifest.tasks) or any(labels[t] != manifest.tasks[t].labels for t in labels):
        raise UserError(f"{cfg_path}: its tasks or labels differ from the manifest's; not the same model")
    net, cfg = load_net(cfg_path, weights)
    for seg, spec in zip(net.segments, manifest.segments, strict=True):
        if tuple(seg.plan.units) != tuple(spec.units or seg.plan.units) or set(seg.variants) != set(
            spec.variants
        ):
            raise UserError(f"{weights}: segment {spec.name} does not match the manifest's units or variants")
    return net, cfg


def owned_segments(net: MultiTaskNet, own: int | None) -> list[int]:
    """Indices of the body segments the new task gets its own variant of (the head always).

    Default: every segment that is not shared. ``own=K``: the segments within the first K units,
    which must end on a segment boundary (a variant file is a whole segment)."""
    body = net.segments[:-1]
    if own is None:
        return [i for i, s in enumerate(body) if not s.plan.shared] + [len(body)]
    bounds, n = [0], 0
    for seg in body:
        n += len(seg.plan.units)
        bounds.append(n)
    if own not in bounds:
        raise UserError(
            f"--own {own}: the plan's segments end after {bounds[1:]} units; the new task can own the "
            f"first K units for K in {bounds} (a variant file holds a whole segment)"
        )
    return [i for i, b in enumerate(bounds[1:]) if b <= own] + [len(body)]


def fresh_variant(
    net: MultiTaskNet, seg_index: int, num_classes: int, seed: int, timm_kwargs: dict | None = None
) -> nn.Module:
    """A freshly initialised variant of one segment (timm's own initialisation)."""
    torch.manual_seed(seed)
    kwargs = dict(timm_kwargs or {})
    template = create_backbone(net.backbone, num_classes=num_classes, **kwargs)
    units, head = split_model(template)
    seg = net.segments[seg_index]
    if seg.plan.name == HEAD:
        return head
    mods = {u.name: m for u, m in units}
    return nn.Sequential(*[mods[u] for u in seg.plan.units])


def attach_task(
    net: MultiTaskNet,
    task: str,
    num_classes: int,
    owned: Sequence[int],
    donor: str,
    init: Init,
    seed: int = 0,
    timm_kwargs: dict | None = None,
) -> list[nn.Module]:
    """Give ``net`` the new task: own variants (id = task name) in ``owned``; elsewhere the shared
    variant, or the donor's for task-specific segments it does not own. Returns the new modules."""
    new: list[nn.Module] = []
    last = len(net.segments) - 1
    for i, seg in enumerate(net.segments):
        donor_vid = seg.plan.assignment[donor]
        if i in owned:
            if task in seg.variants:
                raise UserError(f"segment {seg.name} already has a variant named {task!r}; pick another name")
            if i == last:
                module = copy.deepcopy(seg.variants[donor_vid]) if init == "stem" else None
                if module is None:
                    module = fresh_variant(net, i, num_classes, seed, timm_kwargs)
                torch.manual_seed(seed)
                module.model.reset_classifier(num_classes)  # new labels: never the donor's classifier
            elif init == "stem":
                module = copy.deepcopy(seg.variants[donor_vid])
            else:
                module = fresh_variant(net, i, num_classes, seed + i, timm_kwargs)
            seg.variants[task] = module
            new.append(module)
            vid = task
        else:
            vid = donor_vid
        seg.plan = SegmentPlan(seg.plan.name, seg.plan.units, {**seg.plan.assignment, task: vid})
    net.task_names.append(task)
    net.num_classes[task] = num_classes
    net.max_classes = max(net.num_classes.values())
    net.segment_plans = [s.plan for s in net.segments]
    return new


def path_features(net: MultiTaskNet, x: torch.Tensor, assignment: Sequence[str]) -> torch.Tensor:
    """Pooled output of the body when segment i runs variant ``assignment[i]``."""
    for seg, vid in zip(net.segments[:-1], assignment, strict=True):
        x = seg.variants[vid](x)
    return x.mean(dim=(2, 3)) if x.ndim == 4 else x


@torch.no_grad()
def probe_donors(
    net: MultiTaskNet,
    owned: Sequence[int],
    data: TaskData,
    eval_tf: Callable,
    per_class: tuple[int, int] = (20, 10),
) -> dict[str, float]:
    """Nearest-class-mean accuracy of the new task's images on each candidate donor's features (the
    body as the new task would start, before any training): a cheap predictor of the best start."""
    candidates: dict[tuple[str, ...], str] = {}
    for t in net.task_names:
        key = tuple(net.segments[i].plan.assignment[t] for i in range(len(net.segments) - 1))
        candidates.setdefault(key, t)
    if len(candidates) == 1:
        return {next(iter(candidates.values())): float("nan")}

    def take(samples, n):
        seen: dict[int, int] = {}
        out = []
        for path, label in samples:
            if seen.get(label, 0) < n:
                seen[label] = seen.get(label, 0) + 1
                out.append((path, label))
        return out

    def load(samples):
        x = torch.stack([eval_tf(load_image(p)) for p, _ in samples])
        return x, torch.tensor([label for _, label in samples])

    xt, yt = load(take(data.train, per_class[0]))
    xv, yv = load(take(data.val, per_class[1]))
    scores = {}
    for key, t in candidates.items():
        ft = nn.functional.normalize(path_features(net, xt, key), dim=1)
        fv = nn.functional.normalize(path_features(net, xv, key), dim=1)
        means = torch.stack([ft[yt == c].mean(0) for c in range(len(data.classes))])
        pred = (fv @ nn.functional.normalize(means, dim=1).T).argmax(1)
        scores[t] = float((pred == yv).float().mean())
    return scores


# -- training ------------------------------------------------------------------------------------


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


@torch.no_grad()
def reference_logits(net: MultiTaskNet, tasks: Sequence[str], size: Sequence[int], seed: int = 123):
    x = torch.randn(4, *size, generator=torch.Generator().manual_seed(seed))
    return {t: net.forward_task(x, t).clone() for t in tasks}


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


def train_new_task(
    net: MultiTaskNet,
    task: str,
    modules: Sequence[nn.Module],
    data: TaskData,
    train_tf: Callable,
    eval_tf: Callable,
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
    cuda = device.type == "cuda"
    sampler = MixedBatchSampler([len(data.train)], cfg.batch_size, cfg.seed)
    loader = make_loader(MixedDataset([data.train], train_tf), sampler, cfg.workers, cfg.seed, cuda)
    val_loader = make_loader(
        MixedDataset([data.val], eval_tf), eval_batches([len(data.val)], cfg.eval_batch_size), 0, 0, cuda
    )
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
            for m in modules:
                m.eval()
            val = evaluate_task(net, task, val_loader, device)
            for m in modules:
                m.train()
            if best is None or val["top1"] > best[0]:
                best = (val["top1"], step, [copy.deepcopy(m.state_dict()) for m in modules])
            bar.set_postfix({"loss": f"{loss_sum / seen:.3f}", "val": f"{val['top1']:.3f}"}, refresh=False)
            if not progress:
                say(f"  step {step}/{cfg.steps}: loss {loss_sum / seen:.3f}, val top-1 {val['top1']:.4f}")
            loss_sum, seen = 0.0, 0
    bar.close()
    assert best is not None
    for m, state in zip(modules, best[2], strict=True):
        m.load_state_dict(state)
    for m in modules:
        m.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if best[1] != cfg.steps:
        val = evaluate_task(net, task, val_loader, device)
    return val, best[1]


# -- export and the new bundle -------------------------------------------------------------------


def export_new_variants(
    net: MultiTaskNet, task: str, owned: Sequence[int], manifest: Manifest, out: Path, seed: int, say
) -> tuple[dict[int, VariantSpec], dict[int, float]]:
    """Export the new task's own variants only (ONNX + parity check at several batch sizes)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(max(PARITY_BATCHES), *manifest.input.size, generator=gen)
    specs, parity = {}, {}
    for i, seg in enumerate(net.segments):
        module = seg.variants[seg.plan.assignment[task]]
        if i in owned:
            rel = Path("segments") / manifest.segments[i].name / f"{task}.onnx"
            if (out / rel).exists():
                raise UserError(f"{out / rel} already exists in the new bundle; pick another task name")
            export_module(module, h[:2], out / rel)
            diff = check_parity(module, out / rel, h, PARITY_BATCHES)
            params = sum(p.numel() for p in module.parameters())
            specs[i] = VariantSpec(file=rel.as_posix(), sha256=sha256_file(out / rel), params=params)
            parity[i] = diff
            say(f"  {rel.as_posix():40s} params={params:>10,d}  max|onnx-torch|={diff:.1e}")
        with torch.no_grad():
            h = module(h)
    return specs, parity


def _device(kind: str) -> torch.device:
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available (use --device cpu or auto)")
    return torch.device("cuda" if kind != "cpu" and torch.cuda.is_available() else "cpu")


@dataclass
class Extended:
    """The in-memory outcome of adding a task to a network (no files)."""

    data: TaskData
    owned: list[int]
    donor: str
    probe: dict[str, float]
    val: dict[str, float]
    best_step: int
    trainable: int
    times: dict[str, float]


def extend_network(
    net: MultiTaskNet,
    run_cfg: dict[str, Any],
    task: str,
    data_root: str | Path,
    cfg: AddTaskConfig,
    *,
    progress: bool = False,
    say: Callable[[str], None] = print,
    where: str = "the bundle",
) -> Extended:
    """Add ``task`` to ``net`` (built from ``run_cfg``, a run's or bundle's config.json) and train its
    own variants; raises if any other task's parameter, buffer or logit moved by one bit."""
    times: dict[str, float] = {}
    if task in net.task_names:
        raise UserError(f"task {task!r} is already in {where}; remove it first or pick another name")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_task(task, data_root)
    train_cfg = run_cfg.get("train_config") or {}
    augment = cfg.augment or AugmentConfig.model_validate(train_cfg.get("augment") or {})
    optimizer = cfg.optimizer or OptimizerConfig.model_validate(train_cfg.get("optimizer") or {})
    dc = dict(run_cfg["data_config"])
    train_tf, eval_tf = transforms(dc, augment)
    old_tasks = list(net.task_names)
    size = tuple(dc["input_size"])
    before = reference_logits(net, old_tasks, size)
    frozen = {k: v.clone() for k, v in net.state_dict().items()}
    owned = owned_segments(net, cfg.own)

    t1 = time.perf_counter()
    if cfg.init_from is not None:
        if cfg.init_from not in old_tasks:
            raise UserError(f"--init-from {cfg.init_from!r}: not a task of {where}; tasks are {old_tasks}")
        donor, probe = cfg.init_from, {}
    else:
        probe = probe_donors(net, owned, data, eval_tf)
        donor = max(probe, key=lambda t: probe[t] if probe[t] == probe[t] else -1.0)
    times["probe_s"] = time.perf_counter() - t1
    timm_kwargs = dict(run_cfg.get("timm_kwargs") or {})
    modules = attach_task(net, task, len(data.classes), owned, donor, cfg.init, cfg.seed, timm_kwargs)
    trainable = sum(p.numel() for m in modules for p in m.parameters())
    owned_names = [net.segments[i].name for i in owned]
    probed = ", ".join(f"{t} {a:.3f}" for t, a in probe.items())
    say(
        f"adding {task!r} ({len(data.classes)} classes, {len(data.train)} train / {len(data.val)} val): "
        f"own {owned_names}, {trainable:,} trainable parameters "
        f"({trainable / max(sum(p.numel() for p in net.parameters()), 1):.1%} of the new model); init "
        + (f"from the variants of {donor!r}" if cfg.init == "stem" else "from scratch")
        + (f" (nearest-class-mean probe: {probed})" if probe else "")
    )

    t2 = time.perf_counter()
    device = _device(cfg.device)
    val, best_step = train_new_task(
        net, task, modules, data, train_tf, eval_tf, cfg, optimizer, device, progress, say
    )
    net.cpu()
    times["train_s"] = time.perf_counter() - t2

    # the other tasks did not move: parameters, buffers (BatchNorm statistics) and logits, bit for bit
    state = net.state_dict()
    moved = [k for k, v in frozen.items() if not torch.equal(state[k], v)]
    after = reference_logits(net, old_tasks, size)
    changed = [t for t in old_tasks if not torch.equal(before[t], after[t])]
    if moved or changed:
        raise RuntimeError(f"add-task changed other tasks: tensors {moved[:5]}, logits of {changed}")
    return Extended(data, owned, donor, probe, val, best_step, trainable, times)


def add_task(
    bundle: str | Path,
    task: str,
    data_root: str | Path,
    out: str | Path,
    cfg: AddTaskConfig | None = None,
    *,
    version: str | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> AddTaskResult:
    """Write ``out``: ``bundle`` plus ``task`` trained on ``data_root`` (ImageFolder train/ + val/)."""
    cfg = cfg or AddTaskConfig()
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    source, old = open_source(bundle)
    out = Path(out)
    check_out_dir(out, source)
    if not task or "/" in task or task.startswith(".") or task != task.strip():
        raise UserError(f"bad task name {task!r}")
    if task in old.tasks:
        raise UserError(f"task {task!r} is already in {source}; remove it first or pick another name")
    net, run_cfg = load_bundle_net(source, old)
    times["load_s"] = time.perf_counter() - t0
    ext = extend_network(net, run_cfg, task, data_root, cfg, progress=progress, say=say, where=str(source))
    times |= ext.times
    owned, donor, probe, val, best_step, data = (
        ext.owned,
        ext.donor,
        ext.probe,
        ext.val,
        ext.best_step,
        ext.data,
    )
    owned_names = [old.segments[i].name for i in owned]

    t3 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    keep = [(s.name, vid) for s in old.segments for vid in s.variants]
    copy_variant_files(source, out, old, keep)
    say(f"exporting the new variants of {task!r} (every other file copied byte for byte):")
    specs, parity = export_new_variants(net, task, owned, old, out, cfg.seed, say)
    segments, variants = [], {}
    for i, seg in enumerate(old.segments):
        vs = dict(seg.variants)
        if i in specs:
            vs[task] = specs[i]
        segments.append(seg.model_copy(update={"variants": vs}).model_dump())
        variants[seg.name] = net.segments[i].plan.assignment[task]
    new_parity = dict(old.parity)
    for i, diff in parity.items():
        name = old.segments[i].name
        new_parity[name] = max(new_parity.get(name, 0.0), diff)
    data_ = old.model_dump()
    new_version = version or f"{old.version}+{task}"
    data_.update(
        version=new_version,
        created_at=now(),
        segments=segments,
        tasks={**{t: s.model_dump() for t, s in old.tasks.items()}, task: TaskSpec(
            labels=list(data.classes), variants=variants).model_dump()},
        parity=new_parity,
    )  # fmt: skip
    manifest = Manifest.model_validate(data_)
    plan = plan_for(manifest, run_cfg["plan"])
    if plan is None:  # cannot happen: the old segments differ on the old tasks
        raise RuntimeError("no sharing plan rebuilds the new layout")
    manifest = manifest.model_copy(update={"plan": plan if isinstance(plan, str) else json.dumps(plan)})
    manifest = finish_manifest(manifest, out)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
        str(out / CHECKPOINT),
        metadata={"format": "pt"},
    )
    times["export_s"] = time.perf_counter() - t3
    times["total_s"] = time.perf_counter() - t0
    entry = history_entry(
        "add-task", task, old, to_version=new_version, data=str(Path(data_root).resolve()),
        config=cfg.model_dump(mode="json"), init_from=donor if cfg.init == "stem" else None,
        owned_segments=owned_names, val=val, best_step=best_step, wall_s=round(times["total_s"], 1),
    )  # fmt: skip
    new_cfg = dict(run_cfg)
    new_cfg.update(
        plan=plan,
        tasks={**run_cfg["tasks"], task: {"labels": list(data.classes)}},
        accounting=manifest.accounting.model_dump() if manifest.accounting else None,
        history=[*run_cfg.get("history", []), entry],
    )
    write_json(out / CONFIG, new_cfg)
    new_files = {specs[i].file: (out / specs[i].file).stat().st_size for i in specs}
    return AddTaskResult(
        out=out,
        manifest=manifest,
        task=task,
        val=val,
        best_step=best_step,
        donor=donor,
        probe=probe,
        owned=owned_names,
        new_files=new_files,
        unchanged_files=len(keep),
        trainable_params=ext.trainable,
        others_bit_identical=True,
        timings=times,
    )


def logits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality of two float arrays (NaN-safe)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
