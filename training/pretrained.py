"""Pretrained backbone weights, loaded the timm way (issue 15).

``--pretrained`` / the config's ``pretrained`` take:

- ``true`` (or ``timm``): the backbone's default pretrained tag from timm's registry (Hugging Face hub);
- ``hf-hub:ORG/NAME``: that hub repository's weights, into the configured backbone
  (``pretrained_cfg_overlay=dict(hf_hub_id=...)``);
- a local file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``): ``pretrained_cfg_overlay=dict(file=...)``.

timm itself loads them (its checkpoint cleaning, ``num_classes`` adaptation: a classifier of another
size is dropped, the heads are new anyway). An unreachable hub, a missing file or weights that do not
fit are one-line :class:`UserError`s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from contract.errors import UserError

HUB_PREFIX = "hf-hub:"
TRUE = ("true", "yes", "1", "timm", "default")


def overlay_for(source: str | bool | Path) -> dict[str, Any] | None:
    """The ``pretrained_cfg_overlay`` for a source (None: the backbone's default pretrained tag)."""
    if source is True or (isinstance(source, str) and source.lower() in TRUE):
        return None
    text = str(source)
    if text.startswith(HUB_PREFIX):
        hub_id = text.removeprefix(HUB_PREFIX)
        if "/" not in hub_id:
            raise UserError(
                f"--pretrained {text}: expected hf-hub:ORG/NAME, e.g. hf-hub:timm/resnet18.a1_in1k"
            )
        return {"hf_hub_id": hub_id, "source": "hf-hub"}
    path = Path(text).expanduser()
    if not path.is_file():
        raise UserError(f"pretrained weights not found: {path}")
    return {"file": str(path.resolve())}


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

        errors += [HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled]
    except ImportError:
        pass
    try:
        import requests

        errors.append(requests.RequestException)
    except ImportError:
        pass
    return tuple(errors)


def create_pretrained(name: str, num_classes: int, source: str | bool | Path, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True, ...)`` from ``source``; one-line errors."""
    from models.backbone import create_backbone

    overlay = overlay_for(source)
    extra = {"pretrained_cfg_overlay": overlay} if overlay else {}
    where = (
        overlay.get("file") or f"{HUB_PREFIX}{overlay['hf_hub_id']}"
        if overlay
        else f"timm's default for {name}"
    )
    try:
        model = create_backbone(name, num_classes=num_classes, pretrained=True, **extra, **kwargs)
        missing = _not_loaded(
            model, lambda: create_backbone(name, num_classes, pretrained=True, **extra, **kwargs)
        )
    except RuntimeError as exc:  # timm's strict load_state_dict: missing / unexpected / size mismatch keys
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise UserError(f"pretrained weights {where} do not fit backbone {name}: {detail[:400]}") from None
    except _hub_errors() as exc:
        if overlay and "file" in overlay:
            raise UserError(f"cannot read pretrained weights {where}: {exc}") from None
        raise UserError(
            f"cannot fetch pretrained weights ({where}): the Hugging Face hub is unreachable or has no such "
            f"weights ({type(exc).__name__}); pass a local file with --pretrained PATH"
        ) from None
    if missing:
        raise UserError(
            f"pretrained weights {where} do not fit backbone {name}: missing {len(missing)} key(s) e.g. "
            f"{missing[:4]}"
        )
    return model


def _not_loaded(model: nn.Module, again) -> list[str]:
    """Body tensors the checkpoint did not set. timm loads non-strictly once it drops a classifier of
    another size, so a missing key would stay randomly initialised: a second build under another seed
    tells which tensors came from the weights (equal) and which from the initialiser (different)."""
    import torch

    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier", "fc")
    prefixes = tuple(f"{c}." for c in ([head] if isinstance(head, str) else head))
    with torch.random.fork_rng():
        torch.manual_seed(torch.initial_seed() + 1)
        other = again().state_dict()
    return sorted(
        k
        for k, v in model.state_dict().items()
        if not k.startswith(prefixes) and v.is_floating_point() and not torch.equal(v, other[k])
    )
