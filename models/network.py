"""The multi-task network: segments with per-task variants over a cut timm backbone."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from contract.accounting import Accounting, account, closest_cut
from contract.plan import HEAD, SegmentPlan, group_rows, head_hidden, parse_plan
from models.backbone import Head, Unit, create_backbone, split_model


def run_grouped(x: torch.Tensor, row_keys: Sequence[str], run, out_width: int | None = None) -> torch.Tensor:
    """Run ``run(key, rows)`` once per key on its rows and put the results back in row order.

    ``out_width``: pad a 2-D result to this width with -inf (heads of different class counts).
    """
    groups = group_rows(row_keys)
    if len(groups) == 1 and out_width is None:
        return run(groups[0][0], x)
    out: torch.Tensor | None = None
    for key, rows in groups:
        index = torch.as_tensor(rows, device=x.device)
        y = run(key, x.index_select(0, index))
        if out is None:
            shape = (x.shape[0], out_width) if out_width is not None else (x.shape[0], *y.shape[1:])
            out = y.new_full(shape, float("-inf")) if out_width is not None else y.new_empty(shape)
        if out_width is not None:
            out[index, : y.shape[1]] = y
        else:
            out[index] = y
    assert out is not None
    return out


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def tie_weights(variants: Sequence[nn.Module]) -> None:
    """Make every variant use the first one's parameters, except in normalisation layers (shared+bn):
    the variants stay complete modules (each exports on its own), their weights are one set."""
    first = list(variants[0].modules())
    for other in variants[1:]:
        for mod, mod0 in zip(other.modules(), first, strict=True):
            if isinstance(mod, NORM_LAYERS):
                continue
            for name, param in list(mod._parameters.items()):
                if param is not None:
                    mod._parameters[name] = mod0._parameters[name]


def norm_param_count(module: nn.Module) -> int:
    """Parameters held by the normalisation layers of ``module``."""
    return sum(p.numel() for m in module.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters())


def widen_head(head: Head, hidden: int) -> None:
    """Replace the head's linear classifier ``Linear(C, n)`` by ``Linear(C, H) -> ReLU -> Linear(H, n)``."""
    path = classifier_path(head.model)
    fc = head.model.get_submodule(path)
    mlp = nn.Sequential(nn.Linear(fc.in_features, hidden), nn.ReLU(), nn.Linear(hidden, fc.out_features))
    head.model.set_submodule(path, mlp)


def classifier_path(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    path = cfg.get("classifier", "fc")
    path = path[0] if isinstance(path, list | tuple) else path
    if not isinstance(model.get_submodule(path), nn.Linear):
        raise ValueError(f"{type(model).__name__}: classifier {path!r} is not a Linear layer; no head:H plan")
    return path


class Segment(nn.Module):
    """One segment: its variants and which variant each task uses."""

    def __init__(self, plan: SegmentPlan, variants: Mapping[str, nn.Module]):
        super().__init__()
        self.plan = plan
        self.name = plan.name
        self.variants = nn.ModuleDict(dict(variants))

    def forward(self, x: torch.Tensor, tasks: Sequence[str], out_width: int | None = None) -> torch.Tensor:
        keys = [self.plan.assignment[t] for t in tasks]
        return run_grouped(x, keys, lambda vid, rows: self.variants[vid](rows), out_width)


class MultiTaskNet(nn.Module):
    """``forward(x, task_ids)`` on a batch that mixes tasks; returns logits padded with -inf."""

    def __init__(
        self,
        backbone: str,
        tasks: Mapping[str, int],
        plan: str | Mapping[str, Mapping[str, str]],
        template: nn.Module | None = None,
        **timm_kwargs,
    ):
        super().__init__()
        self.backbone = backbone
        self.task_names = list(tasks)
        self.num_classes = dict(tasks)
        first = self.num_classes[self.task_names[0]]
        if template is None:
            template = create_backbone(backbone, num_classes=first, **timm_kwargs)
        self.template_classes = template.num_classes
        units, head = split_model(copy.deepcopy(template))
        self.units: list[Unit] = [u for u, _ in units]
        unit_mods = {u.name: m for u, m in units}
        self.segment_plans = parse_plan(plan, self.task_names, [u.name for u in self.units])
        self.plan_spec = plan
        self.classifier_in_features = head.model.get_submodule(classifier_path(head.model)).in_features
        hidden = head_hidden(plan)
        segments = []
        for sp in self.segment_plans:
            if sp.name == HEAD:
                variants = {sp.assignment[t]: self._head(head, self.num_classes[t]) for t in self.task_names}
                for v in variants.values() if hidden else ():
                    widen_head(v, hidden)
            else:
                body = nn.Sequential(*[unit_mods[u] for u in sp.units])
                variants = {v: copy.deepcopy(body) for v in sp.variants}
                if sp.tied:
                    tie_weights(list(variants.values()))
            segments.append(Segment(sp, variants))
        self.segments = nn.ModuleList(segments)
        self.max_classes = max(self.num_classes.values())

    @staticmethod
    def _head(template_head: Head, num_classes: int) -> Head:
        head = copy.deepcopy(template_head)
        if head.model.num_classes != num_classes:  # a new Linear, as timm's reset_classifier makes it
            path = classifier_path(head.model)  # (which MobileNetV3 cannot run once its pool is body)
            head.model.set_submodule(path, nn.Linear(head.model.get_submodule(path).in_features, num_classes))
            head.model.num_classes = num_classes
        return head

    # -- forward ---------------------------------------------------------------------------
    def task_list(self, task_ids: torch.Tensor | Sequence[int]) -> list[str]:
        ids = task_ids.tolist() if isinstance(task_ids, torch.Tensor) else list(task_ids)
        return [self.task_names[i] for i in ids]

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        tasks = self.task_list(task_ids)
        for seg in self.segments[:-1]:
            x = seg(x, tasks)
        return self.segments[-1](x, tasks, out_width=self.max_classes)

    def forward_task(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """All rows belong to ``task``: logits of exactly that task's width."""
        for seg in self.segments:
            x = seg.variants[seg.plan.assignment[task]](x)
        return x

    def variant_module(self, segment: str, variant: str) -> nn.Module:
        return self.segments[[s.name for s in self.segments].index(segment)].variants[variant]

    # -- accounting ------------------------------------------------------------------------
    def unit_params(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for seg in self.segments[:-1]:
            body = next(iter(seg.variants.values()))
            for unit, mod in zip(seg.plan.units, body, strict=True):
                counts[unit] = sum(p.numel() for p in mod.parameters())
        return counts

    def norm_params(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for seg in self.segments[:-1]:
            body = next(iter(seg.variants.values()))
            for unit, mod in zip(seg.plan.units, body, strict=True):
                counts[unit] = norm_param_count(mod)
        return counts

    def head_params(self) -> dict[str, int]:
        head = self.segments[-1]
        return {
            t: sum(p.numel() for p in head.variants[head.plan.assignment[t]].parameters())
            for t in self.task_names
        }

    def accounting(self) -> Accounting:
        return account(self.segment_plans, self.unit_params(), self.head_params(), self.norm_params())


def plan_for_proportion(
    backbone: str, tasks: Mapping[str, int], kind: str, target: float, **timm_kwargs
) -> tuple[str, Accounting]:
    """The ``bottom:K``/``top:K`` plan of ``backbone`` whose task-specific proportion is closest to target."""
    net = MultiTaskNet(backbone, tasks, "shared", **timm_kwargs)
    return closest_cut(
        kind, net.task_names, [u.name for u in net.units], net.unit_params(), net.head_params(), target
    )
