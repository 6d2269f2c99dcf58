"""Element-wise sums as modules, so residual and FPN additions can be found and quantized."""

from __future__ import annotations

import torch
from torch import nn

from model_quantization.nn.base import QuantizedModule, register_quantized_module
from model_quantization.quantizers import Quantizer

__all__ = ["Add", "QAdd"]


class Add(nn.Module):
    """``a + b``. A ``+`` in ``forward`` is invisible to module conversion; this module is not."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


@register_quantized_module(Add)
class QAdd(QuantizedModule, Add):
    """Quantized sum: ``output_quantizer(a' + b')`` with ``a' = input_quantizer(a)`` (same for ``b``).

    When inputs are aligned, both summands go through the *same* quantizer, so they share one step size
    and the sum is exact in integer arithmetic (what an integer backend must do anyway). Without
    alignment ``input_quantizer`` is off and only the output is quantized.
    """

    def attach(self, *, output_quantizer: Quantizer, input_quantizer: Quantizer) -> None:
        self.output_quantizer = output_quantizer
        self.input_quantizer = input_quantizer

    @property
    def align_inputs(self) -> bool:
        return self.input_quantizer.enabled

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer.enabled:
            a, b = self.input_quantizer(a), self.input_quantizer(b)
        return self.output_quantizer(super().forward(a, b))
