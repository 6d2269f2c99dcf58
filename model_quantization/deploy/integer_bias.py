"""Integer biases: train with the bias that integer kernels really add (``MODEL.QUANTIZATION.INTEGER_BIAS``).

ONNX Runtime's integer convolutions (``QLinearConv``, ``ConvInteger``) accumulate ``x codes * w codes`` in
int32 and add the conv's bias in the same units, ``s_x * s_w / k`` per output channel (a folded norm's
``|g|`` is in ``s_w``; ``k`` is the export's code spread); when it fuses a conv it rounds the float bias to
that grid. The fake-quant model adds the float bias. In a low-bit detector an output that this rounding
moves across a rounding boundary of the next quantizer changes by a whole step, and the change cascades:
measured on trained RetinaNet R-18 4/4 models, the fused engine's head outputs had cosine 0.96-0.99 to the
Q/DQ graph and lost 0.3-0.4 AP. Rounding the graph's biases alone does not help: the engine then matches
the graph, and both differ from the model that was trained (and evaluated) by the same cascade.

:func:`attach_integer_bias` makes the fake-quant model add the rounded bias itself, in training and in
evaluation: for every quantized conv whose input and weight have an integer grid, the rounding
``integer_bias(b) - b`` of its folded bias ``b = g * bias + h`` (``g, h``: the eval-mode affine of the norm
that folds into it, per level for per-level norms; ``b = bias`` without a norm) is added right after that
norm (forward hooks on the norm), or to the conv's bias while it runs (without a norm). It is computed
without gradient from the current quantizer steps and the running statistics as they are before the norm
runs (a training step updates them in place; a compiled graph applies that at its end). In eval mode the model then
computes what the integer engine computes, up to float rounding; the export (:func:`~.lowering.lower`)
writes the same rounded biases (``module.integer_bias``), so the fake-quant model, the Q/DQ graph and the
fused engine agree, and the fused kernels' speed comes without the parity loss.

The rounding uses the smallest spread the export can give (:func:`~.grids.grid_spread`); any other weight
container or a finer per-channel spread only refines the grid, on which the rounded bias stays exact.
"""

from __future__ import annotations

import torch
from torch import nn

from model_quantization.nn import QConv2d
from model_quantization.quantizers import GridUnavailable

from .grids import grid_spread, integer_bias
from .lowering import conv_norm, following_norms
from .norms import NORM_AFFINES

__all__ = ["IntegerBias", "attach_integer_bias"]

KEY = "MODEL.QUANTIZATION.INTEGER_BIAS"


class IntegerBias:
    """The bias rounding of one quantized conv, added where the conv's bias (or its folded norm) acts.

    Attributes:
        conv: the quantized conv.
        name: its qualified name (for errors).
        norm: the norm folded into it at export, or None (the rounding goes into the conv's own bias).
        level: the next level of a per-level norm (cycled call by call, like the norm itself).
    """

    def __init__(self, conv: QConv2d, name: str, norm: nn.Module | None) -> None:
        self.conv, self.name, self.norm = conv, name, norm
        self._affines = None if norm is None else NORM_AFFINES.for_type(type(norm))
        self.level = 0
        self._saved_bias: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None

    @torch.no_grad()
    def offset(self, level: int) -> torch.Tensor | None:
        """Per output channel, the rounded minus the float folded bias of ``level``; None while a quantizer
        has not been initialised from data yet (the first batch)."""
        conv = self.conv
        try:
            x_grid = conv.input_quantizer.integer_grid()
            w_grid = conv.weight_quantizer.integer_grid(conv.weight.detach())
        except GridUnavailable as exc:
            if conv.input_quantizer.is_initialized and conv.weight_quantizer.is_initialized:
                raise ValueError(f"{KEY}: {self.name!r} has no integer grid: {exc}") from None
            return None
        if x_grid.axis is not None or x_grid.scale.numel() != 1:
            raise ValueError(f"{KEY}: {self.name!r}: a per-channel input grid has no integer convolution")
        channels = conv.weight.shape[0]
        input_scale = x_grid.scale.detach().to(torch.float32).reshape(())  # the graph's float32 step
        weight_scale = w_grid.scale.detach().to(torch.float32).reshape(-1).expand(channels)
        bias = torch.zeros(channels) if conv.bias is None else conv.bias.detach().to(torch.float32)
        if self._affines is not None:
            g, h = self._affines(self.norm)[level]
            bias, weight_scale = g * bias + h, weight_scale * g
        spread = grid_spread(w_grid.qmin - w_grid.zero_point, w_grid.qmax - w_grid.zero_point)
        return integer_bias(bias, input_scale, weight_scale, spread) - bias

    # ---- after a folded norm: computed before the norm runs (in training it updates its running statistics
    # in place, which a compiled graph applies only at its end), added to its output
    def before_norm(self, norm: nn.Module, inputs) -> None:
        levels = len(self._affines(norm))
        level, self.level = self.level, (self.level + 1) % levels
        self._pending = self.offset(level)

    def after_norm(self, norm: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        delta, self._pending = self._pending, None
        if delta is None:
            return None
        return output + delta.to(output.dtype).reshape(1, -1, *([1] * (output.dim() - 2)))

    # ---- without a norm: the conv's bias is substituted while it runs (before any activation it applies)
    def before_conv(self, conv: nn.Module, args) -> None:
        delta = self.offset(0)
        if delta is None:
            return
        params = conv._parameters
        self._saved_bias = params["bias"]
        params["bias"] = self._saved_bias + delta.to(self._saved_bias.dtype)

    def after_conv(self, conv: nn.Module, args, output) -> None:
        if self._saved_bias is not None:
            conv._parameters["bias"], self._saved_bias = self._saved_bias, None


def attach_integer_bias(network: nn.Module) -> list[str]:
    """Make every quantized conv of ``network`` whose input and weight are quantized add its bias rounded to
    the int32 grid of integer kernels (see the module docstring); returns their qualified names.

    A norm that folds into a conv at export is found as the export finds it (its epilogue norm, or the norm
    after it in an ``nn.Sequential``, of a type registered in :data:`~.norms.NORM_AFFINES`); register the
    norm types and conv epilogues of an architecture before calling this (importing
    :mod:`model_quantization.deploy.detectors` registers detectron2's and AdelaiDet's).

    Raises:
        ValueError: naming the conv, at the first forward pass that has initialised its quantizers, when
            one of them states no integer grid (LQ-Net's learned levels): it has no integer kernel.
    """
    norms_after = following_norms(network)
    attached = []
    for name, module in network.named_modules():
        if not isinstance(module, QConv2d):
            continue
        if not (module.weight_quantizer.enabled and module.input_quantizer.enabled):
            continue  # no integer kernel: the export keeps the conv in float
        _, norm = conv_norm(module, name, norms_after.get(name))
        if norm is not None and not _folds(norm):
            norm = None  # not folded at export: its conv's own bias is what the kernel adds
        rounding = IntegerBias(module, name, norm)
        if norm is not None:
            norm.register_forward_pre_hook(rounding.before_norm)
            # first among the norm's hooks: an output quantizer there (OUTPUT_QUANTIZERS) takes the rounded sum
            norm.register_forward_hook(rounding.after_norm, always_call=True, prepend=True)
        elif module.bias is not None:
            module.register_forward_pre_hook(rounding.before_conv)
            module.register_forward_hook(rounding.after_conv, always_call=True)
        else:
            continue  # no bias, no norm: the kernel adds nothing
        module.integer_bias = True
        attached.append(name)
    return attached


def _folds(norm: nn.Module) -> bool:
    """Whether the export folds ``norm`` (a registered type whose affine can be computed)."""
    affines = NORM_AFFINES.for_type(type(norm))
    if affines is None:
        return False
    try:
        affines(norm)
    except ValueError:  # e.g. BatchNorm without running statistics
        return False
    return True
