"""Cut a timm CNN into units: the stem, then every block, in forward order.

Running the units in order equals ``model.forward_features`` (MobileNetV3: then its pooled ``conv_head``,
which the body holds); ``model.forward_head`` with the body removed is the classifier head. Stage
boundaries (timm's ``feature_info``) are a subset of the cuts.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

SUPPORTED = ("ResNet", "EfficientNet", "MobileNetV3", "ConvNeXt")
SUPPORTED_EXAMPLES = "resnet10t/18/34/50, efficientnet_b0.., mobilenetv3_*, convnext_*"


class BackboneError(ValueError):
    """A backbone this project cannot cut."""


@dataclass(frozen=True)
class Unit:
    name: str
    paths: tuple[str, ...]  # submodule paths of the timm model, run in order
    stage_end: bool  # a stage boundary from feature_info follows this unit


def create_backbone(name: str, num_classes: int, **kwargs) -> nn.Module:
    """``timm.create_model`` with a clear error for unknown or unsupported backbones."""
    if name not in timm.list_models() and not timm.is_model(name):
        raise BackboneError(f"unknown backbone {name!r}; supported families: {SUPPORTED_EXAMPLES}")
    kwargs.setdefault("pretrained", False)  # training.pretrained passes True with a pretrained_cfg_overlay
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    if type(model).__name__ not in SUPPORTED:
        raise BackboneError(
            f"backbone {name!r} ({type(model).__name__}) is not supported; "
            f"supported families: {SUPPORTED_EXAMPLES}"
        )
    return model


def _blocks(model: nn.Module, stages_attr: str, inner: str = "") -> list[list[str]]:
    stages = model.get_submodule(stages_attr)
    out = []
    for i, stage in enumerate(stages):
        blocks = stage.get_submodule(inner) if inner else stage
        out.append([f"{stages_attr}.{i}.{inner + '.' if inner else ''}{j}" for j in range(len(blocks))])
    return out


def _has_params(model: nn.Module, path: str) -> bool:
    return any(True for _ in model.get_submodule(path).parameters())


def body_units(model: nn.Module) -> list[Unit]:
    """The model's body as units: stem, then one unit per block (the neck joins the last block)."""
    kind = type(model).__name__
    if kind == "ResNet":
        stem, neck = ["conv1", "bn1", "act1", "maxpool"], []
        stages = [
            [f"layer{i}.{j}" for j in range(len(model.get_submodule(f"layer{i}")))] for i in range(1, 5)
        ]
    elif kind == "EfficientNet":
        stem, stages, neck = ["conv_stem", "bn1"], _blocks(model, "blocks"), ["conv_head", "bn2"]
    elif kind == "MobileNetV3":
        # the "efficient head" pools, then a 1x1 conv_head (576 -> 1024 in the small model): shared body
        # like EfficientNet's conv_head, so a task's own head is only its classifier (else 7 copies of it)
        neck = [p for p in ("global_pool", "conv_head", "norm_head", "act2") if hasattr(model, p)]
        stem, stages = ["conv_stem", "bn1"], _blocks(model, "blocks")
    elif kind == "ConvNeXt":
        stem, neck = ["stem"], ["norm_pre"]
        stages = _blocks(model, "stages", "blocks")
        for i, blocks in enumerate(stages):  # a stage's downsample runs with its first block
            blocks[0:1] = [f"stages.{i}.downsample|{blocks[0]}"]
    else:
        raise BackboneError(f"{kind} is not supported; supported families: {SUPPORTED_EXAMPLES}")
    units = [Unit("stem", tuple(stem), True)]
    for blocks in stages:  # each entry of `stages` is one timm stage (feature_info's coarse cuts)
        for j, block in enumerate(blocks):
            paths = tuple(block.split("|"))
            units.append(Unit(paths[-1], paths, j == len(blocks) - 1))
    last = units[-1]
    units[-1] = Unit(last.name, last.paths + tuple(neck), last.stage_end)
    return [u for u in units if u.paths]


class UnitModule(nn.Sequential):
    """The submodules of one unit, run in order."""


def unit_module(model: nn.Module, unit: Unit) -> nn.Module:
    return UnitModule(*[model.get_submodule(p) for p in unit.paths])


class Head(nn.Module):
    """The model's own ``forward_head`` with the body removed (so it holds only head parameters)."""

    def __init__(self, model: nn.Module, units: list[Unit]):
        super().__init__()
        for unit in units:
            for path in unit.paths:
                model.set_submodule(path, nn.Identity())
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(x)


def split_model(model: nn.Module) -> tuple[list[tuple[Unit, nn.Module]], Head]:
    """Split a timm model into its body units and its head. The model object is consumed."""
    units = body_units(model)
    modules = [(u, unit_module(model, u)) for u in units]
    return modules, Head(model, units)
