"""``MODEL.QUANTIZATION``: the detectron2 config schema, parsed once into a :class:`QuantizationConfig`.

The schema mirrors the core spec in detectron2's upper-case style::

    MODEL:
      QUANTIZATION:
        ENABLED: True
        WEIGHT:     {METHOD: "lsq", BITS: 4, SIGNED: True,  GRANULARITY: "per_tensor", OPTIONS: {}}
        ACTIVATION: {METHOD: "lsq", BITS: 4, SIGNED: False, GRANULARITY: "per_tensor", OPTIONS: {}}
        ALIGN_ADD_INPUTS: False
        RULES:                 # ordered; PATTERN is a glob on qualified module names (and their parents)
          - {PATTERN: "backbone.bottom_up.stem.conv1", WEIGHT: {BITS: 8}, ACTIVATION: {BITS: 8, SIGNED: True}}
          - {PATTERN: "head.cls_score", WEIGHT: {BITS: 8}, ACTIVATION: {BITS: 8}}
          - {PATTERN: "roi_heads", SKIP: True}
        FPN_ACTIVATION: ""     # "relu": ReLU after the FPN's lateral/output convs (FPN-BN with MODEL.FPN.NORM)
        QUANTIZER_LR_FACTOR: 1.0       # learning rate of quantizer parameters (steps, clips) x BASE_LR
        QUANTIZER_WEIGHT_DECAY: 0.0    # weight decay of quantizer parameters
        BACKBONE_WEIGHTS: ""           # double-init: a quantized backbone checkpoint loaded over MODEL.WEIGHTS
        GENERATED_WEIGHTS: True        # quantize call-time weights too (CondInst's dynamic mask head)
        SCOPE: "all"                   # "backbone": heads of the meta-architecture stay float
        REINIT_QUANTIZERS: False       # drop quantizer state of MODEL.WEIGHTS, initialise it from data again
                                       #   (progressive bit widths: a 2-bit run from a 4-bit checkpoint)
        FREEZE_BN_AFTER: 0.0           # fraction of SOLVER.MAX_ITER after which BN statistics stop updating
                                       #   (a schedule option: applies with quantization off too)
        COMPILE: False                 # torch.compile the quantized network (backbone, FPN, head towers)
        INTEGER_BIAS: False            # train with conv biases (after folded norms) on the int32 grid that
                                       #   ONNX Runtime's integer kernels add them on (fused export == model)
        OUTPUT_QUANTIZERS: []          # globs of quantized convs whose outputs get an 8-bit quantizer, so
                                       #   that they export as int8-out QLinearConv (see nn/outputs.py)
        DISTILLATION:                  # knowledge distillation from the float teacher (RetinaNet, FCOS)
          ENABLED: False
          TEACHER_WEIGHTS: ""          # the float teacher's checkpoint ("": MODEL.WEIGHTS)
          LOGITS_WEIGHT: 1.0           # KD on the classification logits (sigmoid, per anchor and class)
          BOX_WEIGHT: 1.0              # KD on the box regression (and FCOS centerness), where the teacher sees objects
          FEATURE_WEIGHT: 0.0          # FPN feature imitation (mean squared error per level)
          TEMPERATURE: 1.0             # softens the teacher's and student's logits

``BITS`` is an integer 1..8, or 0 for "off" (full precision; yacs keeps one type per key). ``OPTIONS``
holds the method's options (e.g. ``{GRAD_SCALE: False, INIT_BATCHES: 4}`` for LSQ), type-checked.
``RULES`` is a yacs list: a config's ``RULES`` *replaces* the list of its ``_BASE_`` (it does not extend it),
so a child config that adds a rule restates its base's rules; the conversion report prints the rules in
effect.

The node is parsed and validated as a whole by :func:`parse_quantization_config`, whether or not
``ENABLED`` is set, so a key that would be ignored is an error rather than a silent no-op. This module
must not import detectron2: :func:`add_quantization_config` runs while ``detectron2.config.defaults`` is
imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..nn.outputs import output_recipe
from ..registry import did_you_mean
from ..spec import QuantSpec

__all__ = [
    "FPN_ACTIVATIONS",
    "SCOPES",
    "WITHOUT_DEPLOY_OPTIONS",
    "DistillationConfig",
    "QuantizationConfig",
    "add_quantization_config",
    "config_key_names",
    "float_config",
    "parse_quantization_config",
]

_RECIPE_KEYS = ("METHOD", "BITS", "SIGNED", "GRANULARITY", "OPTIONS")
_RULE_KEYS = ("PATTERN", "SKIP", "WEIGHT", "ACTIVATION")
FPN_ACTIVATIONS = ("", "relu")
SCOPES = ("all", "backbone")
PREFIX = "MODEL.QUANTIZATION"


def add_quantization_config(cfg) -> None:
    """Add the ``MODEL.QUANTIZATION`` node (quantization off) to a detectron2/yacs config in place."""
    node_type = type(cfg)  # detectron2's CfgNode, without importing detectron2 (we run inside its import)

    def recipe(signed: bool):
        node = node_type()
        node.METHOD = "lsq"
        node.BITS = 4
        node.SIGNED = signed
        node.GRANULARITY = "per_tensor"
        node.OPTIONS = node_type(new_allowed=True)
        return node

    q = node_type()
    q.ENABLED = False
    q.WEIGHT = recipe(signed=True)
    q.ACTIVATION = recipe(signed=False)
    q.ALIGN_ADD_INPUTS = False
    q.RULES = []
    q.FPN_ACTIVATION = ""
    q.QUANTIZER_LR_FACTOR = 1.0
    q.QUANTIZER_WEIGHT_DECAY = 0.0
    q.BACKBONE_WEIGHTS = ""
    q.GENERATED_WEIGHTS = True
    q.SCOPE = "all"
    q.REINIT_QUANTIZERS = False
    q.FREEZE_BN_AFTER = 0.0
    q.COMPILE = False
    q.INTEGER_BIAS = False
    q.OUTPUT_QUANTIZERS = []
    kd = node_type()
    kd.ENABLED = False
    kd.TEACHER_WEIGHTS = ""
    kd.LOGITS_WEIGHT = 1.0
    kd.BOX_WEIGHT = 1.0
    kd.FEATURE_WEIGHT = 0.0
    kd.TEMPERATURE = 1.0
    q.DISTILLATION = kd
    cfg.MODEL.QUANTIZATION = q


@dataclass(frozen=True)
class QuantizationConfig:
    """``MODEL.QUANTIZATION`` parsed and validated: what modeling, the optimizer and the tools read.

    Attributes:
        enabled: quantize the model.
        spec: the core spec (recipes and rules), validated even when quantization is off.
        fpn_activation: ``""`` or ``"relu"`` (FPN-BN).
        scope: ``"all"`` or ``"backbone"``.
        generated_weights: quantize call-time weights (CondInst's mask head).
        backbone_weights: a quantized backbone checkpoint loaded over ``MODEL.WEIGHTS`` (double init).
        lr_factor, weight_decay: optimizer settings of quantizer parameters.
        reinit_quantizers: drop the quantizer state of loaded checkpoints (initialise it from data again).
        freeze_bn_after: fraction of the schedule after which BN statistics are frozen (0: never).
        distillation: knowledge distillation settings, or None when off.
        compile: compile the quantized network with ``torch.compile``.
        integer_bias: conv biases on the int32 grid of integer kernels
            (:mod:`model_quantization.deploy.integer_bias`).
        output_quantizers: globs of the quantized convs whose outputs get an 8-bit quantizer
            (:mod:`model_quantization.nn.outputs`).
    """

    enabled: bool
    spec: QuantSpec
    fpn_activation: str = ""
    scope: str = "all"
    generated_weights: bool = True
    backbone_weights: str = ""
    lr_factor: float = 1.0
    weight_decay: float = 0.0
    reinit_quantizers: bool = False
    freeze_bn_after: float = 0.0
    distillation: DistillationConfig | None = None
    compile: bool = False
    integer_bias: bool = False
    output_quantizers: tuple[str, ...] = ()


@dataclass(frozen=True)
class DistillationConfig:
    """``MODEL.QUANTIZATION.DISTILLATION``: the float teacher and the weights of the KD losses."""

    teacher_weights: str
    logits_weight: float = 1.0
    box_weight: float = 1.0
    feature_weight: float = 0.0
    temperature: float = 1.0


def _check_keys(data: Any, valid: tuple[str, ...], where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping with keys {', '.join(valid)}, got {data!r}")
    for key in data:
        if key not in valid:
            raise ValueError(f"{where}: unknown key {key!r}: {did_you_mean(str(key), valid)}")


def _recipe_dict(node: Any, where: str) -> dict[str, Any]:
    _check_keys(dict(node), _RECIPE_KEYS, where)
    out: dict[str, Any] = {}
    for key, value in dict(node).items():
        if key == "BITS" and not isinstance(value, bool):  # False is not 0 here: it is a type error
            value = "off" if value in (0, "off", None) else value
        elif key == "GRANULARITY" and isinstance(value, str):
            value = value.lower()
        elif key == "OPTIONS":
            if not isinstance(value, dict):
                raise ValueError(
                    f"{where}.OPTIONS: expected a mapping of option names to values, got {value!r}"
                )
            value = {str(k).lower(): v for k, v in dict(value).items()}
        out[key.lower()] = value
    return out


def spec_dict(q) -> dict[str, Any]:
    """The core spec dict that a ``MODEL.QUANTIZATION`` node describes (keys checked, not yet validated)."""
    rules = []
    if not isinstance(q.RULES, list | tuple):
        raise ValueError(f"{PREFIX}.RULES: expected a list of rules, got {q.RULES!r}")
    for i, rule in enumerate(q.RULES):
        where = f"{PREFIX}.RULES[{i}]"
        _check_keys(dict(rule) if isinstance(rule, dict) else rule, _RULE_KEYS, where)
        out: dict[str, Any] = {"pattern": rule.get("PATTERN")}
        if "SKIP" in rule:
            out["skip"] = rule["SKIP"]
        for role in ("WEIGHT", "ACTIVATION"):
            if role in rule:
                out[role.lower()] = _recipe_dict(rule[role], f"{where}.{role}")
        rules.append(out)
    return {
        "weight": _recipe_dict(q.WEIGHT, f"{PREFIX}.WEIGHT"),
        "activation": _recipe_dict(q.ACTIVATION, f"{PREFIX}.ACTIVATION"),
        "align_add_inputs": q.ALIGN_ADD_INPUTS,
        "rules": rules,
    }


#: ``merge_from_list`` pairs that switch the deploy options (``INTEGER_BIAS``, ``OUTPUT_QUANTIZERS``) back to
#: the schema defaults: the ``*_mixed`` recipe, which turns them on, without them.
WITHOUT_DEPLOY_OPTIONS = (f"{PREFIX}.INTEGER_BIAS", False, f"{PREFIX}.OUTPUT_QUANTIZERS", [])

#: What only applies to quantization-aware training, switched off with it by :func:`float_config`.
_QAT_ONLY = {
    "ENABLED": False,
    "REINIT_QUANTIZERS": False,
    "INTEGER_BIAS": False,
    "OUTPUT_QUANTIZERS": [],
    "BACKBONE_WEIGHTS": "",
}


def float_config(cfg):
    """A clone of ``cfg`` (frozen as ``cfg`` is) that builds the float model: quantization off, and with it
    every option that only applies to quantized models (distillation, ``REINIT_QUANTIZERS``,
    ``INTEGER_BIAS``, ``OUTPUT_QUANTIZERS``, ``BACKBONE_WEIGHTS``), which the config check would refuse on a float model."""
    clone = cfg.clone()
    frozen = clone.is_frozen()
    clone.defrost()
    for key, value in _QAT_ONLY.items():
        setattr(clone.MODEL.QUANTIZATION, key, value)
    clone.MODEL.QUANTIZATION.DISTILLATION.ENABLED = False
    if frozen:
        clone.freeze()
    return clone


def config_key_names(message: str) -> str:
    """Rewrite the spec's ``rules[0] ('x').weight.bits: ...`` prefix as config keys (quoted parts kept)."""
    where, sep, rest = message.partition(": ")
    if not sep or not re.match(r"(weight|activation|rules\[\d+\]|align_add_inputs)(?=[ .]|$)", where):
        return f"{PREFIX}: {message}"
    parts = re.split(r"('[^']*')", where)
    upper = "".join(p if p.startswith("'") else p.upper() for p in parts)
    return f"{PREFIX}.{upper}: {rest}"


def _choice(value: Any, choices: tuple[str, ...], key: str, noun: str) -> str:
    if value not in choices:
        raise ValueError(f"{PREFIX}.{key}: unknown {noun} {value!r}: {did_you_mean(str(value), choices)}")
    return value


def _number(value: Any, key: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
        raise ValueError(f"{PREFIX}.{key}: must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _patterns(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"{PREFIX}.{key}: expected a list of non-empty glob strings, got {value!r}")
    return tuple(value)


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{PREFIX}.{key}: must be true or false, got {value!r}")
    return value


def _as_yacs(node: Any) -> Any:
    """The node as YACS holds it: detectron2 also builds models from ``OmegaConf.create(cfg.dump())``, where
    lists are ``ListConfig`` and mappings ``DictConfig``; read those as the plain lists and dicts they hold."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # detectron2 depends on omegaconf; without it no such config can exist
        return node
    if not isinstance(node, DictConfig):
        return node
    from detectron2.config import CfgNode

    return CfgNode(OmegaConf.to_container(node, resolve=True))


def parse_quantization_config(cfg) -> QuantizationConfig:
    """Parse and validate ``cfg.MODEL.QUANTIZATION`` as a whole (also when ``ENABLED`` is False).

    Raises:
        ValueError: naming the config key (``MODEL.QUANTIZATION.RULES[2].WEIGHT.BITS``, ...) and the closest
            valid names, for any invalid key, method, bit width, option, contradictory rule, or a setting
            that quantization being off would silently ignore.
    """
    q = _as_yacs(cfg.MODEL.QUANTIZATION)
    enabled = _boolean(q.ENABLED, "ENABLED")
    try:
        spec = QuantSpec.from_dict(spec_dict(q))
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(PREFIX) else config_key_names(message)) from None
    backbone_weights = q.BACKBONE_WEIGHTS
    if backbone_weights:
        if not enabled:
            raise ValueError(
                f"{PREFIX}.BACKBONE_WEIGHTS={backbone_weights!r} is set but {PREFIX}.ENABLED is False: a "
                f"quantized backbone checkpoint means nothing for a float model (clear it, or enable "
                f"quantization)"
            )
        if not Path(backbone_weights).is_file():
            raise ValueError(f"{PREFIX}.BACKBONE_WEIGHTS: no such file: {backbone_weights!r}")
    reinit = _boolean(q.REINIT_QUANTIZERS, "REINIT_QUANTIZERS")
    freeze_bn_after = _number(q.FREEZE_BN_AFTER, "FREEZE_BN_AFTER")
    if freeze_bn_after > 1.0:
        raise ValueError(
            f"{PREFIX}.FREEZE_BN_AFTER: a fraction of SOLVER.MAX_ITER in [0, 1], got {freeze_bn_after!r}"
        )
    distillation = _parse_distillation(cfg)
    integer_bias = _boolean(q.INTEGER_BIAS, "INTEGER_BIAS")
    output_quantizers = _patterns(q.OUTPUT_QUANTIZERS, "OUTPUT_QUANTIZERS")
    if output_quantizers and enabled:
        for signed in (True, False):
            where = f"{PREFIX}.OUTPUT_QUANTIZERS (the ACTIVATION recipe at 8 bits, signed={signed})"
            output_recipe(spec.activation, where, signed)
    if not enabled:
        # FREEZE_BN_AFTER is a schedule option and applies to float fine-tunes too.
        ignored = [
            key
            for key, on in (
                ("REINIT_QUANTIZERS", reinit),
                ("DISTILLATION.ENABLED", distillation),
                ("INTEGER_BIAS", integer_bias),
                ("OUTPUT_QUANTIZERS", bool(output_quantizers)),
            )
            if on
        ]
        if ignored:
            raise ValueError(
                f"{PREFIX}.{ignored[0]} is set but {PREFIX}.ENABLED is False: it only applies to "
                f"quantization-aware training (clear it, or enable quantization)"
            )
    return QuantizationConfig(
        enabled=enabled,
        spec=spec,
        fpn_activation=_choice(q.FPN_ACTIVATION, FPN_ACTIVATIONS, "FPN_ACTIVATION", "activation"),
        scope=_choice(q.SCOPE, SCOPES, "SCOPE", "scope"),
        generated_weights=_boolean(q.GENERATED_WEIGHTS, "GENERATED_WEIGHTS"),
        backbone_weights=backbone_weights,
        lr_factor=_number(q.QUANTIZER_LR_FACTOR, "QUANTIZER_LR_FACTOR"),
        weight_decay=_number(q.QUANTIZER_WEIGHT_DECAY, "QUANTIZER_WEIGHT_DECAY"),
        reinit_quantizers=reinit,
        freeze_bn_after=freeze_bn_after,
        distillation=distillation,
        compile=_boolean(q.COMPILE, "COMPILE"),
        integer_bias=integer_bias,
        output_quantizers=output_quantizers,
    )


def _parse_distillation(cfg) -> DistillationConfig | None:
    kd = cfg.MODEL.QUANTIZATION.DISTILLATION
    if not _boolean(kd.ENABLED, "DISTILLATION.ENABLED"):
        return None
    # May be empty: a model built for inference, export or a benchmark needs no teacher; the first training
    # step refuses a missing one (training.build_teacher).
    teacher = kd.TEACHER_WEIGHTS or cfg.MODEL.WEIGHTS
    weights = {
        key: _number(getattr(kd, key.upper()), f"DISTILLATION.{key.upper()}")
        for key in ("logits_weight", "box_weight", "feature_weight")
    }
    if not any(weights.values()):
        raise ValueError(f"{PREFIX}.DISTILLATION is enabled but every loss weight is 0")
    temperature = _number(kd.TEMPERATURE, "DISTILLATION.TEMPERATURE")
    if temperature <= 0:
        raise ValueError(f"{PREFIX}.DISTILLATION.TEMPERATURE: must be > 0, got {temperature!r}")
    return DistillationConfig(teacher_weights=teacher, temperature=temperature, **weights)
