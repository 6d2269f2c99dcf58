"""Element-wise sums as modules, so residual, FPN and BiFPN additions can be found and quantized."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model_quantization.nn.base import QuantizedModule, register_quantized_module
from model_quantization.quantizers import Quantizer

__all__ = ["Add", "QAdd", "QWeightedAdd", "QuantizedSumModule", "WeightedAdd"]


class Add(nn.Module):
    """``a + b``. A ``+`` in ``forward`` is invisible to module conversion; this module is not."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class WeightedAdd(nn.Module):
    """BiFPN's fast normalised fusion: ``sum_i w_i x_i`` with ``w = relu(weight) / (sum(relu(weight)) + eps)``.

    The fusion weights are passed with each call rather than owned: they stay a parameter of the module
    that declares them (EfficientDet/AdelaiDet's ``SingleBiFPN.weights_f<level>_<inputs>``), so state-dict
    keys and hence existing checkpoints are unchanged. The arithmetic is exactly AdelaiDet's
    (``stack`` along a new last dim, scale, ``sum``), so outputs are bit-identical to the inline code.
    """

    def __init__(self, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, inputs: Sequence[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        weights = F.relu(weight)
        norm_weights = weights / (weights.sum() + self.eps)
        return (norm_weights * torch.stack(list(inputs), dim=-1)).sum(dim=-1)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class QuantizedSumModule(QuantizedModule):
    """Quantizers of a sum: ``output_quantizer`` on the result, ``input_quantizer`` on every summand.

    When inputs are aligned, all summands go through the *same* quantizer, so they share one step size
    and the sum is exact in integer arithmetic (what an integer backend must do anyway). Without
    alignment ``input_quantizer`` is off and only the output is quantized.
    """

    def attach(self, *, output_quantizer: Quantizer, input_quantizer: Quantizer) -> None:
        self.output_quantizer = output_quantizer
        self.input_quantizer = input_quantizer

    @property
    def align_inputs(self) -> bool:
        return self.input_quantizer.enabled


@register_quantized_module(Add)
class QAdd(QuantizedSumModule, Add):
    """Quantized sum: ``output_quantizer(a' + b')`` with ``a' = input_quantizer(a)`` (same for ``b``)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer.enabled:
            a, b = self.input_quantizer(a), self.input_quantizer(b)
        return self.output_quantizer(super().forward(a, b))


@register_quantized_module(WeightedAdd)
class QWeightedAdd(QuantizedSumModule, WeightedAdd):
    """Quantized fusion: ``output_quantizer(sum_i w_i x_i')`` with ``x_i' = input_quantizer(x_i)``.

    The normalised fusion weights are per-input scalars: an integer backend folds them into the
    requantization scale of each summand, as it does with the summands' step sizes in an ``Add``, so they
    are not quantized themselves (and train in float, receiving their gradients as before).
    """

    def forward(self, inputs: Sequence[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer.enabled:
            inputs = [self.input_quantizer(x) for x in inputs]
        return self.output_quantizer(super().forward(inputs, weight))
