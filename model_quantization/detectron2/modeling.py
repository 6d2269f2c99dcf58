"""The build-time hook: turn a freshly built detectron2 model into the quantized model its config asks for.

Called by the patched ``detectron2.modeling.build_model`` for every meta-architecture (AdelaiDet's
included). Two steps, both no-ops under an unmodified config:

1. architecture options that quantized models need, e.g. ``FPN_ACTIVATION: relu`` (FPN-BN: unsigned
   quantized activations need non-negative conv inputs, so the FPN's convs get a ReLU after their norm;
   other FPN-like necks, e.g. AdelaiDet's BiFPN, are registered in :data:`FPN_CONVS`);
2. with ``MODEL.QUANTIZATION.ENABLED``, :func:`model_quantization.convert` with the config's spec, in place,
   and the conversion report in the log (also kept as ``model.quantization_report``);
3. with ``BACKBONE_WEIGHTS``, the double-init hook (:mod:`.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch.nn.functional as F
from torch import nn

from ..convert import convert
from ..nn import DynamicConv2d
from ..spec import QuantSpec, Rule
from .checkpoint import attach_backbone_weights, load_backbone_weights
from .config import _config_key_names, spec_from_cfg
from .heads import head_skip_rules

__all__ = ["FPN_CONVS", "apply_architecture_options", "quantize"]

logger = logging.getLogger(__name__)

#: FPN-like necks other than detectron2's ``FPN``, by class name: a function that returns the convs whose
#: outputs ``FPN_ACTIVATION`` rectifies. Integrations register theirs (``model_quantization.adelaidet``:
#: AdelaiDet's ``BiFPN``) without this module importing them.
FPN_CONVS: dict[str, Callable[[nn.Module], list[nn.Module]]] = {}


class ConvReLU(nn.Conv2d):
    """``relu(conv(x))`` with nn.Conv2d's parameters and names (FPN-BN for top-block convs P6/P7)."""

    def forward(self, x):
        return F.relu(super().forward(x))


def _relu_after(conv: nn.Module) -> None:
    from detectron2.layers import Conv2d

    if isinstance(conv, Conv2d):  # conv -> norm -> activation inside its own forward
        conv.activation = F.relu
    elif type(conv) is nn.Conv2d:
        conv.__class__ = ConvReLU  # same parameters and names: checkpoints still load
    else:
        raise TypeError(f"FPN_ACTIVATION: cannot add a ReLU after {type(conv).__name__}")


def _fpn_convs(fpn: nn.Module) -> list[nn.Module]:
    convs = [*fpn.lateral_convs, *fpn.output_convs]
    # Extra levels (RetinaNet's P6/P7, FCOS's P6/P7): their outputs feed the heads too.
    if fpn.top_block is not None:
        convs += [c for c in fpn.top_block.modules() if isinstance(c, nn.Conv2d)]
    return convs


def apply_architecture_options(model: nn.Module, cfg) -> list[str]:
    """Apply ``MODEL.QUANTIZATION.FPN_ACTIVATION`` to every detectron2 FPN (and :data:`FPN_CONVS` neck).

    Returns the qualified names of the convs that got a ReLU.
    """
    if not cfg.MODEL.QUANTIZATION.FPN_ACTIVATION:
        return []
    from detectron2.modeling.backbone import FPN

    from .. import adelaidet  # noqa: F401  (registers AdelaiDet's BiFPN)

    changed = []
    for name, module in model.named_modules():
        if isinstance(module, FPN):
            found = _fpn_convs(module)
        elif type(module).__name__ in FPN_CONVS:
            found = FPN_CONVS[type(module).__name__](module)
        else:
            continue
        convs = {id(c): c for c in found}
        names = {id(m): f"{name}.{n}" if name else n for n, m in module.named_modules()}
        for conv in convs.values():
            _relu_after(conv)
            changed.append(names[id(conv)])
    if not changed:
        raise ValueError(
            f"MODEL.QUANTIZATION.FPN_ACTIVATION is set, but the model has no FPN "
            f"(known: detectron2's FPN, {', '.join(sorted(FPN_CONVS))})"
        )
    return sorted(changed)


def _skip_generated_weight_convs(model: nn.Module, spec: QuantSpec) -> QuantSpec:
    """GENERATED_WEIGHTS: False keeps convs with call-time weights (CondInst's mask head) in float."""
    names = [name for name, m in model.named_modules() if isinstance(m, DynamicConv2d)]
    if not names:
        raise ValueError(
            "MODEL.QUANTIZATION.GENERATED_WEIGHTS is False, but the model has no generated-weight convs"
        )
    return dataclasses.replace(spec, rules=(*spec.rules, *(Rule(pattern=n, skip=True) for n in names)))


def quantize(model: nn.Module, cfg) -> nn.Module:
    """Apply the architecture options and, when enabled, quantize ``model`` in place as ``cfg`` says."""
    relu_convs = apply_architecture_options(model, cfg)
    if relu_convs:
        logger.info(
            "FPN_ACTIVATION=%s after %d FPN convs", cfg.MODEL.QUANTIZATION.FPN_ACTIVATION, len(relu_convs)
        )
    if not cfg.MODEL.QUANTIZATION.ENABLED:
        return model
    spec = spec_from_cfg(cfg)
    if not cfg.MODEL.QUANTIZATION.GENERATED_WEIGHTS:
        spec = _skip_generated_weight_convs(model, spec)
    head_rules = head_skip_rules(model, cfg.MODEL.QUANTIZATION.SCOPE)
    if head_rules:
        spec = dataclasses.replace(spec, rules=(*spec.rules, *head_rules))
    try:
        model, report = convert(model, spec, inplace=True)
    except ValueError as exc:  # e.g. a rule that matches no module: name the config key
        raise ValueError(_config_key_names(str(exc))) from None
    logger.info("Quantized %s as MODEL.QUANTIZATION says:\n%s", type(model).__name__, report)
    model.quantization_report = report
    if cfg.MODEL.QUANTIZATION.BACKBONE_WEIGHTS:
        attach_backbone_weights(model, cfg.MODEL.QUANTIZATION.BACKBONE_WEIGHTS)
        if not cfg.MODEL.WEIGHTS:  # no detector checkpoint will be loaded to trigger it
            load_backbone_weights(model, cfg.MODEL.QUANTIZATION.BACKBONE_WEIGHTS)
    return model
