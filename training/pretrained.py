"""Pretrained backbone weights from a local file (timm or torchvision layout), never downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from ``.safetensors`` or a weights-only torch checkpoint."""
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses arbitrary pickles: say so in one line
            raise ValueError(f"{path}: cannot read as a weights-only torch checkpoint ({exc})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(template: torch.nn.Module, path: str | Path) -> None:
    """Load a local timm/torchvision checkpoint into the template model; the classifier is reset."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    state = read_state_dict(path)
    classifier = (
        template.pretrained_cfg.get("classifier", "fc") if hasattr(template, "pretrained_cfg") else "fc"
    )
    prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
    own = {k: v for k, v in template.state_dict().items() if not k.startswith(prefixes)}
    state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems = [
        f"{label} {len(keys)} key(s) e.g. {keys[:4]}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch in", shape))
        if keys
    ]
    if problems:
        raise ValueError(f"{path} does not fit backbone {type(template).__name__}: " + "; ".join(problems))
    template.load_state_dict(state, strict=False)
