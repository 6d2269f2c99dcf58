"""``MODEL.QUANTIZATION``: the detectron2 config schema of a :class:`~model_quantization.spec.QuantSpec`.

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
        SCOPE: "all"                   # "backbone": heads of the meta-architecture stay float (heads.py)

``BITS`` is an integer 1..8, or 0 for "off" (full precision; yacs keeps one type per key). ``OPTIONS``
holds the method's options (e.g. ``{GRAD_SCALE: False, INIT_BATCHES: 4}`` for LSQ). This module must not
import detectron2: :func:`add_quantization_config` runs while ``detectron2.config.defaults`` is imported.
"""

from __future__ import annotations

import re
from typing import Any

from ..registry import did_you_mean
from ..spec import QuantSpec

__all__ = ["add_quantization_config", "spec_dict_from_cfg", "spec_from_cfg"]

_RECIPE_KEYS = ("METHOD", "BITS", "SIGNED", "GRANULARITY", "OPTIONS")
_RULE_KEYS = ("PATTERN", "SKIP", "WEIGHT", "ACTIVATION")
FPN_ACTIVATIONS = ("", "relu")


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
    cfg.MODEL.QUANTIZATION = q


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
        if key == "BITS":
            value = "off" if value in (0, "off", None) else value
        elif key == "GRANULARITY" and isinstance(value, str):
            value = value.lower()
        elif key == "OPTIONS":
            value = {str(k).lower(): v for k, v in dict(value).items()}
        out[key.lower()] = value
    return out


def spec_dict_from_cfg(cfg) -> dict[str, Any]:
    """The core spec dict that ``cfg.MODEL.QUANTIZATION`` describes (keys checked, not yet validated)."""
    q = cfg.MODEL.QUANTIZATION
    rules = []
    if not isinstance(q.RULES, list | tuple):
        raise ValueError(f"MODEL.QUANTIZATION.RULES: expected a list of rules, got {q.RULES!r}")
    for i, rule in enumerate(q.RULES):
        where = f"MODEL.QUANTIZATION.RULES[{i}]"
        _check_keys(dict(rule) if isinstance(rule, dict) else rule, _RULE_KEYS, where)
        out: dict[str, Any] = {"pattern": rule.get("PATTERN")}
        if "SKIP" in rule:
            out["skip"] = rule["SKIP"]
        for role in ("WEIGHT", "ACTIVATION"):
            if role in rule:
                out[role.lower()] = _recipe_dict(rule[role], f"{where}.{role}")
        rules.append(out)
    return {
        "weight": _recipe_dict(q.WEIGHT, "MODEL.QUANTIZATION.WEIGHT"),
        "activation": _recipe_dict(q.ACTIVATION, "MODEL.QUANTIZATION.ACTIVATION"),
        "align_add_inputs": q.ALIGN_ADD_INPUTS,
        "rules": rules,
    }


def _config_key_names(message: str) -> str:
    """Rewrite the spec's ``rules[0] ('x').weight.bits: ...`` prefix as config keys (quoted parts kept)."""
    where, sep, rest = message.partition(": ")
    if not sep or not re.match(r"(weight|activation|rules\[\d+\]|align_add_inputs)(?=[ .]|$)", where):
        return f"MODEL.QUANTIZATION: {message}"
    parts = re.split(r"('[^']*')", where)
    upper = "".join(p if p.startswith("'") else p.upper() for p in parts)
    return f"MODEL.QUANTIZATION.{upper}: {rest}"


def spec_from_cfg(cfg) -> QuantSpec:
    """Build and validate the spec of ``cfg.MODEL.QUANTIZATION``.

    Raises:
        ValueError: naming the config key (``MODEL.QUANTIZATION.RULES[2].WEIGHT.BITS``, ...) and the closest
            valid names, for any invalid key, method, bit width, option or contradictory rule.
    """
    q = cfg.MODEL.QUANTIZATION
    if q.FPN_ACTIVATION not in FPN_ACTIVATIONS:
        raise ValueError(
            f"MODEL.QUANTIZATION.FPN_ACTIVATION: unknown activation {q.FPN_ACTIVATION!r}: "
            f"{did_you_mean(str(q.FPN_ACTIVATION), FPN_ACTIVATIONS)}"
        )
    data = spec_dict_from_cfg(cfg)
    try:
        return QuantSpec.from_dict(data)
    except ValueError as exc:
        raise ValueError(_config_key_names(str(exc))) from None
