"""Lowering: a fake-quant network becomes a network of explicit Q/DQ ops, integer weights and folded norms.

:func:`lower` deep-copies a network and replaces every quantized module by what its export handler returns.
Handlers live in :data:`EXPORT_HANDLERS`, the package's one :class:`~model_quantization.registry.Registry`
type keyed by quantized module type (looked up along the MRO, so ``QConv2d[detectron2 Conv2d]`` finds the
``QConv2d`` handler). A quantized module type without a handler is refused by name, as is a quantizer that
cannot state its grid (see :mod:`.grids`). The lowered network computes, in PyTorch, what the ONNX graph
computes, and :mod:`torch.onnx` turns its custom ops into ``QuantizeLinear``/``DequantizeLinear``
(:mod:`.ops`).

A conv's *epilogue* (what its float class's ``forward`` does after the convolution) is also a registry,
:data:`CONV_EPILOGUES`, keyed by the class that defines ``forward``: plain ``nn.Conv2d`` has none,
detectron2's ``Conv2d`` applies ``norm`` then ``activation``. A conv subclass whose ``forward`` is not
registered is refused rather than silently exported without its extra behaviour. A norm right after a
quantized conv (its epilogue norm, or its next sibling in an ``nn.Sequential``, as in detectron2's and
AdelaiDet's shared heads) is folded into it when :data:`~.norms.NORM_AFFINES` knows its type; per-level
norms give the conv one weight scale and bias per level, with the same integer codes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model_quantization.nn import Add, QAdd, QConv2d, QLinear, QuantizedModule, QWeightedAdd, WeightedAdd
from model_quantization.registry import Registry

from .grids import ActivationQDQ, ExportError, activation_qdq, grid_spread, integer_bias, weight_codes
from .norms import Affine, norm_affines
from .ops import dequantize, quantize_dequantize

__all__ = [
    "CONV_EPILOGUES",
    "EXPORT_HANDLERS",
    "DeployAdd",
    "DeployConv2d",
    "DeployLinear",
    "DeployQDQ",
    "DeployWeightedAdd",
    "Epilogue",
    "LoweringContext",
    "LoweringSummary",
    "TapRecorder",
    "lower",
    "conv_norm",
    "following_norms",
    "register_export_handler",
]

#: quantized module type -> handler(module, context) -> the module that replaces it in the lowered copy.
EXPORT_HANDLERS: Registry[Callable[[nn.Module, LoweringContext], nn.Module]] = Registry("export handler for")


def register_export_handler(quantized_type: type[QuantizedModule]):
    """Decorator: ``handler(module, ctx) -> nn.Module`` lowers modules of ``quantized_type`` (and subclasses)."""
    return EXPORT_HANDLERS.register(quantized_type)


class Epilogue(NamedTuple):
    """What a conv class's ``forward`` applies after the convolution: a norm, then an activation."""

    norm: nn.Module | None
    activation: Callable[[torch.Tensor], torch.Tensor] | None


#: class that defines a conv's ``forward`` -> function(module) -> its :class:`Epilogue`.
CONV_EPILOGUES: Registry[Callable[[nn.Module], Epilogue]] = Registry("conv forward")
CONV_EPILOGUES.add(nn.Conv2d, lambda module: Epilogue(None, None))


def _forward_owner(cls: type) -> type:
    """The class in ``cls``'s MRO whose ``forward`` runs."""
    return next(klass for klass in cls.__mro__ if "forward" in vars(klass))


def conv_epilogue(module: QuantizedModule, name: str) -> Epilogue:
    """The epilogue of a quantized conv's float class, or :class:`ExportError` if its forward is unknown."""
    owner = _forward_owner(module.float_class)
    if owner not in CONV_EPILOGUES:
        raise ExportError(
            f"cannot export {name!r}: its class {module.float_class.__qualname__} has its own forward(), and "
            f"no epilogue is registered for it in model_quantization.deploy.CONV_EPILOGUES (known: "
            f"{', '.join(CONV_EPILOGUES.names())})"
        )
    return CONV_EPILOGUES.get(owner)(module)


class TapRecorder:
    """Collects every activation Q/DQ output of one forward pass, named ``<quantizer>#<call>``.

    The debug export returns them as extra graph outputs, which is how reference parity compares every
    quantized activation of ONNX Runtime with the fake-quant model's.
    """

    def __init__(self) -> None:
        self.active = False
        self.taps: list[tuple[str, torch.Tensor]] = []
        self._calls: dict[str, int] = {}

    def start(self) -> None:
        self.active, self.taps, self._calls = True, [], {}

    def stop(self) -> list[tuple[str, torch.Tensor]]:
        self.active = False
        return self.taps

    def record(self, name: str, value: torch.Tensor) -> None:
        if self.active:
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            # a copy: the network may modify the value in place afterwards (detectron2's F.relu_ on sums)
            self.taps.append((f"{name}#{call}", value.clone()))


class DeployQDQ(nn.Module):
    """An activation quantizer as ``[Where] -> QuantizeLinear -> [Clip] -> DequantizeLinear``."""

    def __init__(self, spec: ActivationQDQ, recorder: TapRecorder | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.recorder = recorder
        self.register_buffer("scale", torch.tensor(spec.scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.sign:  # binary: no zero level, x >= 0 -> +scale (sign(0) = +1, like the quantizer)
            x = torch.where(x >= 0, self.scale, -self.scale)
        s = self.spec
        out = quantize_dequantize(x, self.scale, s.zero_point, s.low, s.high, False)
        if self.recorder is not None:
            self.recorder.record(s.name, out)
        return out

    def extra_repr(self) -> str:
        s = self.spec
        return f"{s.name}, scale={s.scale:.6g}, zero_point={s.zero_point}, codes=[{s.low}, {s.high}]"


@dataclass
class LoweringContext:
    """What a handler gets besides the module.

    Attributes:
        name: qualified name of the module in the network.
        next_norm: the norm that follows the module as its next sibling in an ``nn.Sequential`` (detection
            heads), or None. A handler that folds it sets ``folded_next_norm`` and the norm becomes an
            ``nn.Identity``.
        recorder: where Q/DQ outputs are recorded for the debug export, or None.
        summary: counters the handler updates for the export report.
    """

    name: str
    next_norm: nn.Module | None
    recorder: TapRecorder | None
    summary: LoweringSummary
    folded_next_norm: bool = False

    def qdq(self, quantizer, attribute: str) -> DeployQDQ | None:
        """The lowered form of the module's quantizer ``attribute`` (None when it is off)."""
        spec = activation_qdq(quantizer, f"{self.name}.{attribute}")
        if spec is None:
            return None
        self.summary.activations.append(spec)
        return DeployQDQ(spec, self.recorder)


@dataclass
class LoweringSummary:
    """What lowering did, for the export report."""

    modules: dict[str, str] = field(default_factory=dict)  #: name -> quantized type
    activations: list[ActivationQDQ] = field(default_factory=list)
    weight_bits: dict[str, int] = field(default_factory=dict)  #: name -> weight bits
    folded_norms: list[str] = field(default_factory=list)  #: "<conv> <- <norm kind> (<levels> levels)"
    unfolded_norms: list[str] = field(default_factory=list)  #: norms left as float ops, with why
    negative_scales: list[str] = field(default_factory=list)  #: channels whose flip would overflow int8
    integer_biases: list[str] = field(
        default_factory=list
    )  #: convs whose biases were trained on the int32 grid
    output_quantizers: list[str] = field(default_factory=list)  #: convs with an 8-bit output quantizer


class DeployConv2d(nn.Module):
    """A lowered conv: Q/DQ'd input, ``DequantizeLinear(int8 codes)`` weight, folded norm, epilogue, and
    the output Q/DQ of a conv with an output quantizer (:mod:`model_quantization.nn.outputs`).

    With per-level folded norms it holds one weight scale and bias per level and, like the norm it
    replaces, cycles through them call by call (the shared head is called once per FPN level, in order).
    """

    def __init__(
        self,
        source: nn.Conv2d,
        *,
        input_qdq: DeployQDQ | None,
        codes: Sequence[torch.Tensor] | None,
        code_index: Sequence[int],
        scales: Sequence[torch.Tensor] | None,
        biases: Sequence[torch.Tensor | None],
        weight: torch.Tensor | None,
        norm: nn.Module | None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None,
        output_qdq: DeployQDQ | None = None,
    ) -> None:
        super().__init__()
        if source.padding_mode != "zeros":
            raise ExportError(f"padding_mode={source.padding_mode!r} is not supported (only 'zeros')")
        self.stride, self.padding = source.stride, source.padding
        self.dilation, self.groups = source.dilation, source.groups
        self.input_qdq = input_qdq
        self.levels = len(biases)
        self.code_index = list(code_index)
        for i, c in enumerate(codes or ()):
            self.register_buffer(f"codes_{i}", c)
        for level in range(self.levels):
            if scales is not None:
                self.register_buffer(f"scale_{level}", scales[level])
            self.register_buffer(f"bias_{level}", biases[level])
        self.register_buffer("weight", weight)
        self.norm = norm
        self.activation = activation
        self.output_qdq = output_qdq
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = self.calls % self.levels
        self.calls += 1
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        if self.weight is not None:
            w = self.weight
        else:
            w = dequantize(
                getattr(self, f"codes_{self.code_index[level]}"), getattr(self, f"scale_{level}"), 0
            )
        y = F.conv2d(
            x, w, getattr(self, f"bias_{level}"), self.stride, self.padding, self.dilation, self.groups
        )
        if self.norm is not None:
            y = self.norm(y)
        if self.activation is not None:
            y = self.activation(y)
        if self.output_qdq is not None:
            y = self.output_qdq(y)
        return y

    def extra_repr(self) -> str:
        return f"levels={self.levels}, stride={self.stride}, padding={self.padding}, groups={self.groups}"


def _fold(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, affine: Affine | None):
    """Fold ``g * (conv(x, codes * scale) + bias) + h`` into new codes, scale and bias (exactly).

    A negative ``g`` flips the channel's codes; if that would overflow int8 (a code of -128) the channel
    keeps its codes and gets a negative scale instead (valid ONNX, and ONNX Runtime runs it), reported.
    Returns ``(codes, scale, bias, number of channels with a negative scale)``.
    """
    out_channels = codes.shape[0]
    bias = torch.zeros(out_channels) if bias is None else bias.detach().to(torch.float32)
    if affine is None:
        return codes, scale, bias, 0
    g, h = affine
    negative = g < 0
    overflow = negative & (codes.reshape(out_channels, -1).to(torch.int16).min(dim=1).values == -128)
    flip = negative & ~overflow
    sign = torch.where(flip, -1, 1).to(torch.int8).reshape(-1, *([1] * (codes.dim() - 1)))
    new_codes = codes * sign
    new_scale = scale * torch.where(flip, -g, g)
    return new_codes, new_scale, g * bias + h, int(overflow.sum())


def conv_norm(
    module: QuantizedModule, name: str, next_norm: nn.Module | None
) -> tuple[Epilogue, nn.Module | None]:
    """A quantized conv's epilogue and the norm that folds into it: its epilogue's norm, else (when its
    epilogue applies nothing) the norm that follows it in an ``nn.Sequential`` (``next_norm``), else None.
    Whether the norm's type can fold is :data:`~.norms.NORM_AFFINES`' business."""
    epilogue = conv_epilogue(module, name)
    norm = epilogue.norm
    if norm is None and epilogue.activation is None and next_norm is not None:
        norm = next_norm
    return epilogue, norm


@register_export_handler(QConv2d)
def lower_conv2d(module: QConv2d, ctx: LoweringContext) -> nn.Module:
    """``QConv2d`` (any ``nn.Conv2d`` subclass with a registered epilogue) -> :class:`DeployConv2d`.

    A conv trained with integer biases (``module.integer_bias``, see :mod:`.integer_bias`) gets its folded
    biases rounded to the int32 grid of integer kernels exactly as it trained, so every kernel choice
    computes what the fake-quant model does.
    """
    epilogue, norm = conv_norm(module, ctx.name, ctx.next_norm)
    output_quantizer = getattr(module, "output_quantizer", None)
    ctx.folded_next_norm = norm is not None and norm is not epilogue.norm
    if output_quantizer is not None and ctx.folded_next_norm != getattr(module, "output_after_next", False):
        problem = (
            "acts on the conv's output, before the separate norm that folds into the conv at export (place "
            "it on that norm, as MODEL.QUANTIZATION.OUTPUT_QUANTIZERS does)"
            if ctx.folded_next_norm
            else "acts after another module, but no norm after the conv folds into it at export"
        )
        raise ExportError(f"cannot export {ctx.name!r}: its output quantizer {problem}")
    if output_quantizer is not None and ctx.folded_next_norm and not module.weight_quantizer.enabled:
        raise ExportError(
            f"cannot export {ctx.name!r}: its output quantizer acts after the separate norm that follows it, "
            f"which cannot fold into a conv with float weights"
        )
    input_qdq = ctx.qdq(module.input_quantizer, "input_quantizer")
    output_qdq = None if output_quantizer is None else ctx.qdq(output_quantizer, "output_quantizer")
    if output_qdq is not None:
        ctx.summary.output_quantizers.append(ctx.name)
    if not module.weight_quantizer.enabled:  # float weight: nothing to fold into a scale, the norm runs as is
        ctx.folded_next_norm = False
        bias = None if module.bias is None else module.bias.detach().clone()
        return DeployConv2d(
            module, input_qdq=input_qdq, codes=None, code_index=[0], scales=None, biases=[bias],
            weight=module.weight.detach().clone(), norm=epilogue.norm, activation=epilogue.activation,
            output_qdq=output_qdq,
        )  # fmt: skip
    w = weight_codes(module.weight_quantizer, module.weight, 0, f"{ctx.name}.weight_quantizer")
    ctx.summary.weight_bits[ctx.name] = module.weight_quantizer.bits
    affines = None
    if norm is not None:
        try:
            affines = norm_affines(norm)
        except ValueError as exc:
            ctx.summary.unfolded_norms.append(f"{ctx.name}: {type(norm).__name__} not folded ({exc})")
        if affines is None and output_quantizer is not None and norm is not epilogue.norm:
            raise ExportError(
                f"cannot export {ctx.name!r}: its output quantizer acts after the separate norm that follows "
                f"it, which does not fold into the conv"
            )
        if affines is None:
            ctx.folded_next_norm = False
            if norm is not epilogue.norm:
                norm = None  # the sibling stays in the Sequential and runs there
        else:
            ctx.summary.folded_norms.append(f"{ctx.name} <- {type(norm).__name__} ({len(affines)} levels)")
            norm = None
    snap = getattr(module, "integer_bias", False) and input_qdq is not None
    if snap:
        spread = grid_spread(w.qmin, w.qmax)
        ctx.summary.integer_biases.append(ctx.name)
    codes, code_index, scales, biases = [], [], [], []
    for affine in affines or [None]:
        c, s, b, negative = _fold(w.codes, w.scale, module.bias, affine)
        if negative:
            ctx.summary.negative_scales.append(f"{ctx.name}: {negative} channels")
        if snap:
            b = integer_bias(b, input_qdq.scale, s, spread)
        match = next((i for i, known in enumerate(codes) if torch.equal(known, c)), None)
        if match is None:
            codes.append(c)
            match = len(codes) - 1
        code_index.append(match)
        scales.append(s.contiguous())
        biases.append(b.contiguous())
    return DeployConv2d(
        module, input_qdq=input_qdq, codes=codes, code_index=code_index, scales=scales, biases=biases,
        weight=None, norm=norm, activation=epilogue.activation, output_qdq=output_qdq,
    )  # fmt: skip


class DeployLinear(nn.Module):
    """A lowered ``QLinear``: ``Gemm``/``MatMul`` on a Q/DQ'd input and ``DequantizeLinear(int8 codes)``."""

    def __init__(self, input_qdq, codes, scale, bias, weight) -> None:
        super().__init__()
        self.input_qdq = input_qdq
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        w = self.weight if self.weight is not None else dequantize(self.codes, self.scale, 0)
        return F.linear(x, w, self.bias)


@register_export_handler(QLinear)
def lower_linear(module: QLinear, ctx: LoweringContext) -> nn.Module:
    """``QLinear`` (plain ``nn.Linear`` forward only) -> :class:`DeployLinear`."""
    if _forward_owner(module.float_class) is not nn.Linear:
        raise ExportError(
            f"cannot export {ctx.name!r}: {module.float_class.__qualname__} has its own forward()"
        )
    input_qdq = ctx.qdq(module.input_quantizer, "input_quantizer")
    bias = None if module.bias is None else module.bias.detach().clone()
    if not module.weight_quantizer.enabled:
        return DeployLinear(input_qdq, None, None, bias, module.weight.detach().clone())
    w = weight_codes(module.weight_quantizer, module.weight, 0, f"{ctx.name}.weight_quantizer")
    ctx.summary.weight_bits[ctx.name] = module.weight_quantizer.bits
    return DeployLinear(input_qdq, w.codes, w.scale, bias, None)


class DeployAdd(Add):
    """A lowered ``QAdd``: aligned summands share one Q/DQ, the sum gets its own."""

    def __init__(self, input_qdq: DeployQDQ | None, output_qdq: DeployQDQ | None) -> None:
        super().__init__()
        self.input_qdq, self.output_qdq = input_qdq, output_qdq

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.input_qdq is not None:
            a, b = self.input_qdq(a), self.input_qdq(b)
        out = super().forward(a, b)
        return out if self.output_qdq is None else self.output_qdq(out)


class DeployWeightedAdd(WeightedAdd):
    """A lowered ``QWeightedAdd`` (BiFPN fusion); the fusion weights stay float scalars."""

    def __init__(self, eps: float, input_qdq: DeployQDQ | None, output_qdq: DeployQDQ | None) -> None:
        super().__init__(eps)
        self.input_qdq, self.output_qdq = input_qdq, output_qdq

    def forward(self, inputs: Sequence[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        if self.input_qdq is not None:
            inputs = [self.input_qdq(x) for x in inputs]
        out = super().forward(inputs, weight)
        return out if self.output_qdq is None else self.output_qdq(out)


@register_export_handler(QAdd)
def lower_add(module: QAdd, ctx: LoweringContext) -> nn.Module:
    return DeployAdd(
        ctx.qdq(module.input_quantizer, "input_quantizer"),
        ctx.qdq(module.output_quantizer, "output_quantizer"),
    )


@register_export_handler(QWeightedAdd)
def lower_weighted_add(module: QWeightedAdd, ctx: LoweringContext) -> nn.Module:
    return DeployWeightedAdd(
        module.eps,
        ctx.qdq(module.input_quantizer, "input_quantizer"),
        ctx.qdq(module.output_quantizer, "output_quantizer"),
    )


def following_norms(network: nn.Module) -> dict[str, nn.Module]:
    """Qualified module name -> the norm that follows it as its next sibling in an ``nn.Sequential``
    (what :func:`conv_norm` gets as ``next_norm``)."""
    return {name: sibling for name, (_, sibling) in _next_siblings(network).items() if _is_norm_like(sibling)}


def _next_siblings(network: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Qualified module name -> (name, module) of its next sibling in an ``nn.Sequential``."""
    following = {}
    for name, module in network.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            prefix = f"{name}." if name else ""
            for (first, _), (second, sibling) in zip(children, children[1:], strict=False):
                following[prefix + first] = (prefix + second, sibling)
    return following


def lower(network: nn.Module, *, record_taps: bool = False) -> tuple[nn.Module, LoweringSummary, TapRecorder]:
    """A lowered deep copy of ``network`` (eval mode); the original is left untouched.

    Args:
        network: any module (a detector's network wrapper, or a small model in tests).
        record_taps: give every activation Q/DQ the returned recorder, for the debug export.

    Returns:
        ``(lowered copy, summary, recorder)``.

    Raises:
        ExportError: naming the module, for a quantized module type without a handler, a quantizer
            without an integer grid, or a grid that does not fit 8-bit containers.
    """
    lowered = copy.deepcopy(network).eval()
    recorder = TapRecorder()
    summary = LoweringSummary()
    siblings = _next_siblings(lowered)
    targets = [(n, m) for n, m in lowered.named_modules() if isinstance(m, QuantizedModule)]
    for name, module in targets:
        if EXPORT_HANDLERS.for_type(type(module)) is None:
            raise ExportError(
                f"cannot export {name!r}: no export handler for {type(module).__qualname__} (handlers: "
                f"{', '.join(EXPORT_HANDLERS.names())}; register one with "
                f"model_quantization.deploy.register_export_handler)"
            )
    replaced_norms: list[str] = []
    replacements: dict[int, nn.Module] = {}
    for name, module in targets:
        sibling_name, sibling = siblings.get(name, (None, None))
        ctx = LoweringContext(
            name=name,
            next_norm=sibling if _is_norm_like(sibling) else None,
            recorder=recorder if record_taps else None,
            summary=summary,
        )
        replacement = EXPORT_HANDLERS.for_type(type(module))(module, ctx)
        summary.modules[name] = type(module).__qualname__
        lowered.set_submodule(name, replacement)
        replacements[id(module)] = replacement
        if ctx.folded_next_norm:
            replaced_norms.append(sibling_name)
    for name in replaced_norms:
        identity = nn.Identity()
        replacements[id(lowered.get_submodule(name))] = identity
        lowered.set_submodule(name, identity)
    _replace_aliases(lowered, replacements)
    return lowered, summary, recorder


def _replace_aliases(root: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Swap replaced modules in plain attributes too: detectron2's FPN iterates Python lists
    (``lateral_convs``, ``output_convs``, ...) that alias its registered submodules."""

    def swap(value):
        if isinstance(value, nn.Module):
            return replacements.get(id(value), value)
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, tuple):
            return tuple(swap(v) for v in value)
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        return value

    for module in root.modules():
        for key, value in list(vars(module).items()):
            if key.startswith("_") or not isinstance(value, (list, tuple, dict)):
                continue
            swapped = swap(value)
            if isinstance(value, list):
                value[:] = swapped  # keep the list object: other code may hold it
            elif isinstance(value, dict):
                value.clear()
                value.update(swapped)
            else:
                setattr(module, key, swapped)


def _is_norm_like(module: Any) -> bool:
    """A module that may be a norm: folding decides with :data:`~.norms.NORM_AFFINES`; this only keeps
    activations, convs and containers of convs from being offered."""
    if module is None or isinstance(module, (QuantizedModule, nn.Conv2d, nn.ReLU, nn.Identity)):
        return False
    from .norms import NORM_AFFINES

    return NORM_AFFINES.for_type(type(module)) is not None


def reset_levels(network: nn.Module) -> None:
    """Restart every per-level conv's cycle at level 0 (before a forward pass that must start there)."""
    for module in network.modules():
        if isinstance(module, DeployConv2d):
            module.calls = 0


def check_levels(network: nn.Module) -> None:
    """Every per-level conv was called a whole number of cycles (one call per level and forward)."""
    for name, module in network.named_modules():
        if isinstance(module, DeployConv2d) and module.calls % module.levels:
            raise ExportError(
                f"{name!r} has {module.levels} per-level norms but was called {module.calls} times in a forward"
            )
