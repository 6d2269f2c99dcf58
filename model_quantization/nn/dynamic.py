"""Convolutions whose weights are inputs, not parameters (CondInst's generated mask-head filters).

CondInst's controller predicts, per instance, the weights of a small mask head that is then run with
``F.conv2d``. A functional call is invisible to module conversion and those weights never pass a weight
quantizer, so a "quantized" CondInst would still run its mask head in float. :class:`DynamicConv2d` is
the float module (exactly ``F.conv2d``); its quantized form quantizes the generated weights with a
per-tensor weight quantizer and the input with the activation quantizer, like any conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_quantization.nn.base import QuantizedModule, register_quantized_module
from model_quantization.quantizers import Quantizer

__all__ = ["DynamicConv2d", "QDynamicConv2d"]


class DynamicConv2d(nn.Module):
    """``F.conv2d(x, weight, bias, groups=groups)`` (stride 1, no padding) with call-time weights."""

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, groups: int = 1
    ) -> torch.Tensor:
        return F.conv2d(x, weight, bias, stride=1, padding=0, groups=groups)


@register_quantized_module(DynamicConv2d)
class QDynamicConv2d(QuantizedModule, DynamicConv2d):
    """:class:`DynamicConv2d` with quantized input and generated weights (per tensor: the weights of all
    instances share one step, learned like any other)."""

    def attach(self, *, weight_quantizer: Quantizer, input_quantizer: Quantizer) -> None:
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, groups: int = 1
    ) -> torch.Tensor:
        return super().forward(self.input_quantizer(x), self.weight_quantizer(weight), bias, groups)
