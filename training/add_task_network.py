"""Add-task's network: rebuilt from a bundle (its checkpoint and config), extended with the new
task's own variants (``attach_task``), and the donor whose variants start them (``choose_donor``)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from contract.errors import UserError
from contract.manifest import Manifest
from contract.plan import HEAD, SegmentPlan
from models.backbone import create_backbone, split_model
from models.network import MultiTaskNet
from training.add_task_bundle import CHECKPOINT, CONFIG
from training.add_task_config import AddTaskConfig, Init
from training.imagefolder import TaskData, load_image


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


def choose_donor(
    net: MultiTaskNet, owned: Sequence[int], data: TaskData, eval_tf: Callable, cfg: AddTaskConfig, where: str
) -> tuple[str, dict[str, float]]:
    """The task whose variants start the new ones: ``cfg.init_from``, else the best probed."""
    if cfg.init_from is not None:
        if cfg.init_from not in net.task_names:
            raise UserError(
                f"--init-from {cfg.init_from!r}: not a task of {where}; tasks are {list(net.task_names)}"
            )
        return cfg.init_from, {}
    probe = probe_donors(net, owned, data, eval_tf)
    return max(probe, key=lambda t: probe[t] if probe[t] == probe[t] else -1.0), probe
