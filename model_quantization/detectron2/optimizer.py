"""Optimizer settings for quantizer parameters (step sizes, clip values, offsets).

detectron2's ``get_default_optimizer_params`` takes ``overrides`` keyed by parameter name (the last
component, e.g. ``step``); the patched ``build_optimizer`` passes :func:`quantizer_overrides`. By default
quantizer parameters get no weight decay: decaying a step size toward 0 shrinks the quantization range.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..quantizers import Quantizer
from .config import parse_quantization_config

__all__ = ["quantizer_overrides"]


def quantizer_overrides(cfg, model: nn.Module) -> dict[str, dict[str, Any]] | None:
    """``{param_name: {"lr": ..., "weight_decay": ...}}`` for every quantizer parameter name, or None.

    Raises:
        ValueError: when a quantizer parameter name is also used by a non-quantizer parameter, so that the
            override would silently change the other one too.
    """
    owners: dict[str, set[bool]] = {}
    for module in model.modules():
        is_quantizer = isinstance(module, Quantizer)
        for name, _ in module.named_parameters(recurse=False):
            owners.setdefault(name, set()).add(is_quantizer)
    names = sorted(n for n, kinds in owners.items() if True in kinds)
    if not names:
        return None
    shared = [n for n in names if False in owners[n]]
    if shared:
        raise ValueError(
            f"MODEL.QUANTIZATION.QUANTIZER_LR_FACTOR/QUANTIZER_WEIGHT_DECAY: quantizer parameter name(s) "
            f"{shared} are also used by other parameters of the model; cannot give them separate settings"
        )
    config = getattr(model, "quantization_config", None) or parse_quantization_config(cfg)
    settings = {"lr": cfg.SOLVER.BASE_LR * config.lr_factor, "weight_decay": config.weight_decay}
    return {name: dict(settings) for name in names}
