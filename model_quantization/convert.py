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
    QuantizedWeightModule,
    quantized_class,
    quantized_module_for,
)
from model_quantization.quantizers import Quantizer, build_quantizer
from model_quantization.registry import close_matches
from model_quantization.spec import QuantSpec, Resolution

__all__ = [
    "ConversionPlan",
    "ConversionReport",
    "ConversionResult",
    "FloatRow",
    "QuantizedRow",
    "apply_plan",
    "check_plan",
    "convert",
    "plan_conversion",
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
    #: The spec's rules in effect, in order ("[i] pattern"), so a config's replaced RULES are visible.
    rules: tuple[str, ...] = ()

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
        rules = ", ".join(self.rules) or "none"
        return (
            f"Rules in effect (a config's RULES replace its base's): {rules}\n\n"
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


@dataclass(frozen=True)
class ConversionPlan:
    """What :func:`convert` will do, decided before anything changes.

    Attributes:
        entries: (qualified name, module, resolution, quantized class) of every module to quantize.
        left_float: modules that stay float, with the reason.
        matched: for every rule index, the names of the quantizable modules it matched.
        effective: for every rule index, the names of the modules where it changes something (a skip, an
            activation override, or a weight override on a module that has weights).
    """

    entries: tuple[tuple[str, nn.Module, Resolution, type[QuantizedModule]], ...]
    left_float: tuple[FloatRow, ...]
    matched: dict[int, tuple[str, ...]]
    effective: dict[int, tuple[str, ...]]


def _has_weight(handler: type[QuantizedModule]) -> bool:
    return issubclass(handler, QuantizedWeightModule | QDynamicConv2d)


def plan_conversion(model: nn.Module, spec: QuantSpec) -> ConversionPlan:
    """Resolve every module of ``model`` against ``spec`` (nothing is changed)."""
    entries = []
    left_float: list[FloatRow] = []
    matched: dict[int, list[str]] = {i: [] for i in range(len(spec.rules))}
    effective: dict[int, list[str]] = {i: [] for i in range(len(spec.rules))}
    for name, module in model.named_modules():
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
        resolution = spec.resolve(name)
        for i in resolution.indices:
            matched[i].append(name)
            rule = spec.rules[i]
            if rule.skip or rule.activation or (rule.weight and _has_weight(handler)):
                effective[i].append(name)
        if resolution.skip_rule is not None:
            left_float.append(FloatRow(name, type_name, f"skipped by rule {resolution.skip_rule!r}"))
        elif resolution.activation.bits is None and (
            not _has_weight(handler) or resolution.weight.bits is None
        ):
            reason = f"all bits 'off' (rules: {', '.join(resolution.rules) or 'defaults'})"
            left_float.append(FloatRow(name, type_name, reason))
        else:
            entries.append((name, module, resolution, handler))
    return ConversionPlan(
        tuple(entries),
        tuple(left_float),
        {i: tuple(v) for i, v in matched.items()},
        {i: tuple(v) for i, v in effective.items()},
    )


def check_plan(model: nn.Module, spec: QuantSpec, plan: ConversionPlan) -> None:
    """``ValueError`` for a rule that would silently do nothing: it matches no quantizable module, or its
    only override is ``weight`` and it matches only modules without weights (sums)."""
    unused = [i for i, names in plan.matched.items() if not names]
    if unused:
        quantizable = [n for n, m in model.named_modules() if n and quantized_module_for(type(m)) is not None]
        i, pattern = unused[0], spec.rules[unused[0]].pattern
        more = f" ({len(unused) - 1} more rule(s) match nothing either)" if len(unused) > 1 else ""
        raise ValueError(
            f"rules[{i}] ({pattern!r}): matches no quantizable module (closest module names: "
            f"{', '.join(close_matches(pattern, quantizable)) or 'none'}){more}"
        )
    for i, names in plan.effective.items():
        if not names:
            matched = plan.matched[i]
            raise ValueError(
                f"rules[{i}] ({spec.rules[i].pattern!r}): its only override is 'weight', but it matches only "
                f"modules without weights ({', '.join(matched[:3])}{', ...' if len(matched) > 3 else ''}), "
                f"so it would change nothing: override 'activation' for sums, or narrow the pattern"
            )


def apply_plan(model: nn.Module, spec: QuantSpec, plan: ConversionPlan) -> ConversionReport:
    """Build every quantizer first (an error leaves the model untouched), then swap the modules."""
    device = _device_of(model, recurse=True)
    prepared = [
        _prepare(name, module, resolution, spec, device) for name, module, resolution, _ in plan.entries
    ]
    for apply, _ in prepared:
        apply()
    rules = tuple(f"[{i}] {rule.pattern}" for i, rule in enumerate(spec.rules))
    return ConversionReport(tuple(row for _, row in prepared), plan.left_float, rules)


def convert(
    model: nn.Module, spec: QuantSpec | Mapping[str, Any], *, inplace: bool = False
) -> ConversionResult:
    """Swap every quantizable module of ``model`` for its quantized version as ``spec`` says.

    Quantizable: ``nn.Conv2d``, ``nn.ConvTranspose2d``, ``nn.Linear``, :class:`~model_quantization.nn.Add`,
    :class:`~model_quantization.nn.WeightedAdd`, :class:`~model_quantization.nn.DynamicConv2d` and their
    subclasses (see :func:`~model_quantization.nn.register_quantized_module` for more). Weight modules get
    an input (activation) and a weight quantizer; sums (``Add``, ``WeightedAdd``) get an output quantizer
    and, with ``align_add_inputs``, one shared quantizer for all summands.

    Three steps: :func:`plan_conversion`, :func:`check_plan`, :func:`apply_plan`.

    Args:
        model: a float model.
        spec: a :class:`QuantSpec` or its dict form.
        inplace: convert ``model`` itself (modules keep their identity, so existing references to
            parameters stay valid); otherwise a deep copy is converted and ``model`` is left untouched.

    Returns:
        ``(model, report)``: the converted model and a :class:`ConversionReport`.

    Raises:
        ValueError: the spec is invalid, a rule matches no quantizable module or would change nothing, a
            module is matched by contradicting rules, or the model already contains quantized modules.
            Nothing is converted then.
    """
    if not isinstance(spec, QuantSpec):
        spec = QuantSpec.from_dict(spec)
    already = [n for n, m in model.named_modules() if isinstance(m, QuantizedModule)]
    if already:
        raise ValueError(
            f"model already contains quantized modules ({', '.join(already[:5])}); convert a float model"
        )
    plan = plan_conversion(model, spec)
    check_plan(model, spec, plan)
    if not inplace:
        model = copy.deepcopy(model)
        by_name = dict(model.named_modules())
        entries = tuple((name, by_name[name], res, handler) for name, _, res, handler in plan.entries)
        plan = dataclasses.replace(plan, entries=entries)
    return ConversionResult(model, apply_plan(model, spec, plan))
