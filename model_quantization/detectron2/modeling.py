"""The build-time hook: turn a freshly built detectron2 model into the quantized model its config asks for.

Called by the patched ``detectron2.modeling.build_model`` for every meta-architecture (AdelaiDet's
included). ``MODEL.QUANTIZATION`` is parsed once (:func:`~.config.parse_quantization_config`, validated
whether or not quantization is on) and kept as ``model.quantization_config``; then:

1. architecture options that quantized models need, e.g. ``FPN_ACTIVATION: relu`` (FPN-BN: unsigned
   quantized activations need non-negative conv inputs, so the FPN's convs get a ReLU after their norm;
   other FPN-like necks, e.g. AdelaiDet's BiFPN, are in :data:`~.architectures.NECKS`);
2. with ``MODEL.QUANTIZATION.ENABLED``, :func:`model_quantization.convert` with the config's spec, in place,
   and the conversion report in the log (also kept as ``model.quantization_report``; :mod:`.logs` routes
   the package's log to detectron2's console and ``OUTPUT_DIR/log.txt``, and logs one line when the
   quantizers have initialised from data);
3. the checkpoint guards (:mod:`.safeguards`: quantizer grid check, ``REINIT_QUANTIZERS``), with
   ``OUTPUT_QUANTIZERS`` 8-bit conv outputs (:mod:`model_quantization.nn.outputs`), with
   ``INTEGER_BIAS`` the bias rounding of integer kernels (:mod:`model_quantization.deploy.integer_bias`)
   and, with ``BACKBONE_WEIGHTS``, the double-init hook (:mod:`.checkpoint`);
4. the training-time parts of the recipe (:mod:`.training`: distillation, BN freezing).

On CPU it also makes glibc keep freed memory for reuse (:func:`model_quantization.allocator.keep_freed_memory`:
a training step's large tensors stop paying page faults every step), for float and quantized models alike.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..allocator import keep_freed_memory
from ..convert import convert
from ..nn import DynamicConv2d
from ..nn.outputs import attach_output_quantizers
from ..spec import QuantSpec, Rule
from .architectures import NECKS, ConvReLU, fpn_convs, head_skip_rules
from .checkpoint import attach_backbone_weights, load_backbone_weights
from .config import QuantizationConfig, config_key_names, parse_quantization_config
from .logs import attach_init_summary, route_to_detectron2_log
from .safeguards import attach_grid_check, attach_reinit
from .training import attach_training_hooks

__all__ = ["apply_architecture_options", "quantize"]

logger = logging.getLogger(__name__)


def _relu_after(conv: nn.Module) -> None:
    from detectron2.layers import Conv2d

    if isinstance(conv, Conv2d):  # conv -> norm -> activation inside its own forward
        conv.activation = F.relu
    elif type(conv) is nn.Conv2d:
        conv.__class__ = ConvReLU  # same parameters and names: checkpoints still load
    else:
        raise TypeError(f"FPN_ACTIVATION: cannot add a ReLU after {type(conv).__name__}")


def apply_architecture_options(model: nn.Module, config: QuantizationConfig) -> list[str]:
    """Apply ``FPN_ACTIVATION`` to every detectron2 FPN (and every neck in :data:`NECKS`).

    Returns the qualified names of the convs that got a ReLU.
    """
    if not config.fpn_activation:
        return []
    from detectron2.modeling.backbone import FPN

    changed = []
    for name, module in model.named_modules():
        if isinstance(module, FPN):
            found = fpn_convs(module)
        elif type(module).__name__ in NECKS:
            found = NECKS.get(type(module).__name__)(module)
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
            f"(known: detectron2's FPN, {', '.join(NECKS.names())})"
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


def _attach_integer_bias(model: nn.Module) -> None:
    """``INTEGER_BIAS``: conv biases on the int32 grid of integer kernels (see the deploy package)."""
    from ..deploy import detectors  # noqa: F401  (registers detectron2's and AdelaiDet's norms and epilogues)
    from ..deploy.integer_bias import attach_integer_bias

    convs = attach_integer_bias(model)
    logger.info(
        "INTEGER_BIAS: %d quantized convs add their biases on the int32 grid of integer kernels", len(convs)
    )


def _attach_output_quantizers(model: nn.Module, config: QuantizationConfig) -> None:
    """``OUTPUT_QUANTIZERS``: 8-bit quantizers on the outputs of the matched quantized convs."""
    from ..deploy import detectors  # noqa: F401  (registers detectron2's and AdelaiDet's norms and epilogues)
    from ..deploy.lowering import conv_epilogue, following_norms

    def rectified(name: str, conv: nn.Module) -> bool:
        return conv_epilogue(conv, name).activation in (F.relu, F.relu_, torch.relu)

    separate = following_norms(model)  # e.g. the shared heads' per-level norms: quantize after them

    def placement(name: str, conv: nn.Module) -> nn.Module:
        return separate.get(name, conv)

    key = "MODEL.QUANTIZATION.OUTPUT_QUANTIZERS"
    convs = attach_output_quantizers(
        model, config.output_quantizers, config.spec.activation, key, rectified, placement
    )
    logger.info("OUTPUT_QUANTIZERS: %d quantized convs quantize their outputs to 8 bits", len(convs))


def quantize(model: nn.Module, cfg) -> nn.Module:
    """Apply the architecture options and, when enabled, quantize ``model`` in place as ``cfg`` says."""
    config = parse_quantization_config(cfg)
    if str(cfg.MODEL.DEVICE).startswith("cpu"):
        keep_freed_memory()
    route_to_detectron2_log()  # train_net.py's console and OUTPUT_DIR/log.txt get the report below
    relu_convs = apply_architecture_options(model, config)
    if relu_convs:
        logger.info("FPN_ACTIVATION=%s after %d FPN convs", config.fpn_activation, len(relu_convs))
    attach_training_hooks(model, cfg, config)
    if not config.enabled:
        return model
    spec = config.spec
    if not config.generated_weights:
        spec = _skip_generated_weight_convs(model, spec)
    head_rules = head_skip_rules(model, config.scope)
    if head_rules:
        spec = dataclasses.replace(spec, rules=(*spec.rules, *head_rules))
    try:
        model, report = convert(model, spec, inplace=True)
    except ValueError as exc:  # e.g. a rule that matches no module: name the config key
        raise ValueError(config_key_names(str(exc))) from None
    logger.info("Quantized %s as MODEL.QUANTIZATION says:\n%s", type(model).__name__, report)
    model.quantization_report = report
    model.quantization_config = config
    if config.output_quantizers:  # before the guards below, which count the model's quantizers
        _attach_output_quantizers(model, config)
    # Pre-hook order: REINIT drops MODEL.WEIGHTS' quantizer state and the grid check reads what is left,
    # both before the double init (below) puts the low-bit backbone's state in.
    if config.reinit_quantizers:
        attach_reinit(model)
    attach_grid_check(model)
    attach_init_summary(model)
    if config.integer_bias:
        _attach_integer_bias(model)
    if config.backbone_weights:
        attach_backbone_weights(model, config.backbone_weights)
        if not cfg.MODEL.WEIGHTS:  # no detector checkpoint will be loaded to trigger it
            load_backbone_weights(model, config.backbone_weights)
    return model
