"""Double initialisation: float detector weights, then a quantized backbone checkpoint on top.

The published low-bit recipes ("double-init") start QAT from a float detector *and* a low-bit backbone
that was quantization-aware fine-tuned on ImageNet, so the backbone's weights and step sizes are already
adapted. ``MODEL.QUANTIZATION.BACKBONE_WEIGHTS`` names that backbone checkpoint. It replaces the backbone part of
the detector checkpoint (``MODEL.WEIGHTS``) while that is loaded, through a load_state_dict pre-hook, so
the unchanged ``DetectionCheckpointer`` / ``train_net.py`` flow does it. A checkpoint that already carries the
backbone's quantizer state (resuming a QAT run, evaluating a trained quantized model) is left alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..quantizers import Quantizer
from ..quantizers.base import RECIPE_KEY

__all__ = ["attach_backbone_weights", "load_backbone_weights"]

logger = logging.getLogger(__name__)
#: Key prefixes a backbone checkpoint may use besides the model's own: a detector with an FPN, a detectron2
#: backbone with a bottom-up network, or none (an ImageNet classifier's backbone).
_PREFIXES = ("backbone.bottom_up.", "bottom_up.", "")


def _bottom_up(model: nn.Module) -> tuple[str, nn.Module]:
    """The bottom-up network a low-bit ImageNet backbone replaces, and its key prefix in the model.

    ``backbone.bottom_up`` of an FPN, ``backbone.bottom_up.backbone`` of AdelaiDet's BiFPN (its bottom-up
    wraps the network with the extra top-level convs, which stay the detector's), or ``backbone`` itself.
    """
    module = getattr(model, "backbone", None)
    if module is None:
        raise ValueError(f"MODEL.QUANTIZATION.BACKBONE_WEIGHTS: {type(model).__name__} has no backbone")
    prefix = "backbone."
    for attr in ("bottom_up", "backbone"):
        inner = getattr(module, attr, None)
        if isinstance(inner, nn.Module):
            module, prefix = inner, f"{prefix}{attr}."
    return prefix, module


def _backbone_state(model: nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint at `path` as a state dict of the model's (bottom-up) backbone, checked to match it."""
    data = torch.load(path, map_location="cpu", weights_only=False)
    state = data.get("model", data) if isinstance(data, dict) else data
    own_prefix, bottom_up = _bottom_up(model)
    expected = set(bottom_up.state_dict())
    stripped: dict[str, torch.Tensor] = {}
    for prefix in dict.fromkeys((own_prefix, *_PREFIXES)):
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if expected & set(stripped):
            break
    missing, unexpected = expected - set(stripped), set(stripped) - expected
    # Backbones saved before quantizers recorded their grid have no such entries: they load without a check.
    missing = {k for k in missing if not k.endswith("." + RECIPE_KEY)}
    if missing or unexpected:
        raise ValueError(
            f"MODEL.QUANTIZATION.BACKBONE_WEIGHTS={path}: does not match the quantized backbone "
            f"(missing: {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    return {k: torch.as_tensor(v) for k, v in stripped.items()}


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load the backbone checkpoint at `path` into ``model.backbone(.bottom_up)``, strictly."""
    _, bottom_up = _bottom_up(model)
    bottom_up.load_state_dict(_backbone_state(model, path), strict=True)
    logger.info("Loaded the quantized backbone (weights and quantizer state) from %s", path)


def attach_backbone_weights(model: nn.Module, path: str) -> None:
    """Make every load of a checkpoint without backbone quantizer state take the backbone from `path`.

    Checked now (a wrong file fails at build time, before training), applied at load time: the backbone
    entries of the incoming state dict are replaced, so the detector's other weights still come from it.
    """
    prefix, bottom_up = _bottom_up(model)
    quantizer_keys = [
        f"{prefix}{name}.{key}"
        for name, module in bottom_up.named_modules()
        if isinstance(module, Quantizer)
        for key in module.state_dict()
    ]
    if not quantizer_keys:
        raise ValueError("MODEL.QUANTIZATION.BACKBONE_WEIGHTS is set, but the backbone has no quantizers")
    backbone = _backbone_state(model, path)

    def before_load(module: nn.Module, state_dict: dict, load_prefix: str, *args) -> None:
        if any(load_prefix + key in state_dict for key in quantizer_keys):
            return  # a quantized checkpoint (resume, evaluation): it has its own backbone state
        for key, value in backbone.items():
            state_dict[f"{load_prefix}{prefix}{key}"] = value
        logger.info("Backbone weights and quantizer state taken from %s (double init)", path)

    model.register_load_state_dict_pre_hook(before_load)
