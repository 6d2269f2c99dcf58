"""Apply a :class:`~model_quantization.spec.QuantSpec` to any ``nn.Module`` and report what was done.

``convert`` first plans every module (resolving rules, validating recipes, checking that every rule
matches something) and only then swaps modules, so a bad spec raises before the model is touched.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from model_quantization.nn import (
    QDynamicConv2d,
    QuantizedModule,
    QuantizedSumModule,
    QuantizedWeightModule,
    quantized_class,
    quantized_module_for,
)
from model_quantization.quantizers import Quantizer, build_quantizer
from model_quantization.registry import close_matches
from model_quantization.spec import QuantSpec, Resolution

__all__ = [
    "ConversionReport",
    "ConversionResult",
    "FloatRow",
    "QuantizedRow",
    "convert",
]


@dataclass(frozen=True)
class QuantizedRow:
    """One converted module."""

    name: str
    type: str  #: the float class
    quantized_type: str
    method: str  #: "lsq", or "weight/activation" methods when they differ
    w_bits: str  #: "4", "ter", "off", or "-" for modules without weights
    a_bits: str
    granularity: str  #: of the weight quantizer ("-" without weights)
    rules: str  #: patterns of the rules that applied, comma separated


@dataclass(frozen=True)
class FloatRow:
    """One module left in floating point, with the reason."""

    name: str
    type: str
    reason: str


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), line, *(fmt.format(*r) for r in rows)])


@dataclass(frozen=True)
class ConversionReport:
    """What ``convert`` did: the quantized modules and the modules left in float (with reasons)."""

    quantized: tuple[QuantizedRow, ...]
    left_float: tuple[FloatRow, ...]

    def rows(self) -> list[dict[str, str]]:
        """One dict per module: quantized rows (``status="quantized"``) then float rows (``status="float"``)."""
        out = [{"status": "quantized", **asdict(r)} for r in self.quantized]
        out += [{"status": "float", **asdict(r)} for r in self.left_float]
        return out

    def __str__(self) -> str:
        quantized = _table(
            ["module", "type", "method", "W", "A", "granularity", "rules"],
            [
                [r.name, r.type, r.method, r.w_bits, r.a_bits, r.granularity, r.rules or "-"]
                for r in self.quantized
            ],
        )
        left = _table(["module", "type", "reason"], [[r.name, r.type, r.reason] for r in self.left_float])
        return (
            f"Quantized modules ({len(self.quantized)}):\n{quantized}\n\n"
            f"Left in float ({len(self.left_float)}):\n{left}"
        )

    def __getitem__(self, name: str) -> QuantizedRow | FloatRow:
        """The row of the module called ``name``."""
        for row in (*self.quantized, *self.left_float):
            if row.name == name:
                return row
        raise KeyError(name)


class ConversionResult(NamedTuple):
    """``model, report = convert(...)``."""

    model: nn.Module
    report: ConversionReport


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


# Modules whose parameters their parent reads directly instead of calling them (nn.MultiheadAttention
# passes out_proj.weight to F.multi_head_attention_forward): converting them would change nothing.
_PARENT_OWNED = (nn.modules.linear.NonDynamicallyQuantizableLinear,)


def _has_own_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )


def _is_norm(module: nn.Module) -> bool:
    # detectron2's FrozenBatchNorm2d (buffers only) / NaiveSyncBatchNorm and the like are recognised by
    # name; containers of norms have no state of their own and are not listed themselves.
    return _has_own_state(module) and (isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__)


def _method_label(weight: Quantizer | None, activation: Quantizer) -> str:
    """ "lsq" when weight and activation share the method, "dorefa/pact" when not, "-" when both are off."""
    methods = [q.method for q in (weight, activation) if q is not None and q.enabled]
    return "/".join(dict.fromkeys(methods)) or "-"


def _device_of(module: nn.Module, recurse: bool = False) -> torch.device:
    """Device of the module's own parameters (all of them with ``recurse``); CPU when it has none."""
    tensor = next(module.parameters(recurse=recurse), None)
    return torch.device("cpu") if tensor is None else tensor.device


def _prepare(
    name: str, module: nn.Module, plan: Resolution, spec: QuantSpec, device
) -> tuple[Any, QuantizedRow]:
    """Build the quantizers for one module (no mutation yet); returns (apply callback, report row)."""
    handler = quantized_module_for(type(module))
    float_type = type(module).__name__
    own = next(module.parameters(recurse=False), None)
    device = own.device if own is not None else device  # Add has no parameters: the model's device
    activation_q = build_quantizer(plan.activation, "activation", owner=f"{name} (input)").to(device)
    if issubclass(handler, QDynamicConv2d):  # weights arrive with each call: no parameter to size by
        if plan.weight.granularity == "per_channel":
            raise ValueError(
                f"module {name!r}: its weights are generated per call (e.g. CondInst's mask head); "
                f"use granularity 'per_tensor' for it"
            )
        weight_q = build_quantizer(plan.weight, "weight", owner=f"{name} (weight)").to(device)
        quantizers = {"weight_quantizer": weight_q, "input_quantizer": activation_q}
        w_bits, granularity = weight_q.bits_label, weight_q.granularity if weight_q.enabled else "-"
    elif issubclass(handler, QuantizedWeightModule):
        axis = handler.weight_channel_axis
        if plan.weight.granularity == "per_channel" and getattr(module, "groups", 1) != 1 and axis != 0:
            raise ValueError(
                f"module {name!r}: per_channel weights of a grouped {float_type} are not supported; "
                f"use granularity 'per_tensor' for it"
            )
        weight_q = build_quantizer(
            plan.weight,
            "weight",
            channel_axis=axis,
            num_channels=module.weight.shape[axis],
            owner=f"{name} (weight)",
        ).to(device)
        quantizers = {"weight_quantizer": weight_q, "input_quantizer": activation_q}
        w_bits, granularity = weight_q.bits_label, weight_q.granularity if weight_q.enabled else "-"
    else:  # QAdd/QWeightedAdd: output quantized with the activation recipe, inputs optionally aligned
        weight_q = None
        activation_q.owner = f"{name} (output)"
        # Unaligned: an "off" input quantizer of the same method and signedness (a bare recipe would
        # default to signed, which unsigned-only methods such as PACT reject), without bit-dependent
        # options (LQ-Net's ternary needs bits=2).
        recipe = (
            plan.activation
            if spec.align_add_inputs
            else dataclasses.replace(plan.activation, bits=None, options={})
        )
        input_q = build_quantizer(recipe, "activation", owner=f"{name} (inputs)").to(device)
        quantizers = {"output_quantizer": activation_q, "input_quantizer": input_q}
        w_bits, granularity = "-", "-"
    row = QuantizedRow(
        name=name,
        type=float_type,
        quantized_type=quantized_class(handler, type(module)).__name__,
        method=_method_label(weight_q, activation_q),
        w_bits=w_bits,
        a_bits=activation_q.bits_label,
        granularity=granularity,
        rules=", ".join(plan.rules),
    )
    return (lambda: handler.from_float(module, **quantizers)), row


def convert(
    model: nn.Module, spec: QuantSpec | Mapping[str, Any], *, inplace: bool = False
) -> ConversionResult:
    """Swap every quantizable module of ``model`` for its quantized version as ``spec`` says.

    Quantizable: ``nn.Conv2d``, ``nn.ConvTranspose2d``, ``nn.Linear``, :class:`~model_quantization.nn.Add`,
    :class:`~model_quantization.nn.WeightedAdd`, :class:`~model_quantization.nn.DynamicConv2d` and their
    subclasses (see :func:`~model_quantization.nn.register_quantized_module` for more). Weight modules get
    an input (activation) and a weight quantizer; sums (``Add``, ``WeightedAdd``) get an output quantizer
    and, with ``align_add_inputs``, one shared quantizer for all summands.

    Args:
        model: a float model.
        spec: a :class:`QuantSpec` or its dict form.
        inplace: convert ``model`` itself (modules keep their identity, so existing references to
            parameters stay valid); otherwise a deep copy is converted and ``model`` is left untouched.

    Returns:
        ``(model, report)``: the converted model and a :class:`ConversionReport`.

    Raises:
        ValueError: the spec is invalid, a rule matches no quantizable module, a module is matched by
            contradicting rules, or the model already contains quantized modules. Nothing is converted then.
    """
    if not isinstance(spec, QuantSpec):
        spec = QuantSpec.from_dict(spec)
    modules = list(model.named_modules())
    already = [n for n, m in modules if isinstance(m, QuantizedModule)]
    if already:
        raise ValueError(
            f"model already contains quantized modules ({', '.join(already[:5])}); convert a float model"
        )

    plans: list[tuple[str, nn.Module, Resolution]] = []
    left_float: list[FloatRow] = []
    used_rules: set[str] = set()
    for name, module in modules:
        if not name:
            continue
        handler = quantized_module_for(type(module))
        type_name = type(module).__name__
        if isinstance(module, _PARENT_OWNED):
            reason = "unsupported: its parent uses the weight directly, quantizing it would have no effect"
            left_float.append(FloatRow(name, type_name, reason))
            continue
        if handler is None:
            if _is_norm(module):
                left_float.append(FloatRow(name, type_name, "normalization layer (float by design)"))
            elif next(module.parameters(recurse=False), None) is not None:
                left_float.append(FloatRow(name, type_name, f"unsupported type {type_name}"))
            continue
        plan = spec.resolve(name)
        used_rules.update(plan.rules)
        if plan.skip_rule is not None:
            left_float.append(FloatRow(name, type_name, f"skipped by rule {plan.skip_rule!r}"))
        elif plan.activation.bits is None and (
            issubclass(handler, QuantizedSumModule) or plan.weight.bits is None
        ):
            reason = f"all bits 'off' (rules: {', '.join(plan.rules) or 'defaults'})"
            left_float.append(FloatRow(name, type_name, reason))
        else:
            plans.append((name, module, plan))

    unused = [(i, rule.pattern) for i, rule in enumerate(spec.rules) if rule.pattern not in used_rules]
    if unused:
        quantizable = [n for n, m in modules if n and quantized_module_for(type(m)) is not None]
        i, pattern = unused[0]
        more = f" ({len(unused) - 1} more rule(s) match nothing either)" if len(unused) > 1 else ""
        raise ValueError(
            f"rules[{i}] ({pattern!r}): matches no quantizable module (closest module names: "
            f"{', '.join(close_matches(pattern, quantizable)) or 'none'}){more}"
        )

    if not inplace:
        model = copy.deepcopy(model)
        by_name = dict(model.named_modules())
        plans = [(name, by_name[name], plan) for name, _, plan in plans]
    # Build every quantizer before swapping any class, so that an error leaves the model untouched.
    device = _device_of(model, recurse=True)
    prepared = [_prepare(name, module, plan, spec, device) for name, module, plan in plans]
    for apply, _ in prepared:
        apply()
    rows = [row for _, row in prepared]
    return ConversionResult(model, ConversionReport(tuple(rows), tuple(left_float)))
