"""Quantized convolution and linear layers (keep the float parameter names: ``weight``, ``bias``)."""

from __future__ import annotations

from torch import nn

from model_quantization.nn.base import QuantizedWeightModule, register_quantized_module

__all__ = ["QConv2d", "QConvTranspose2d", "QLinear"]


@register_quantized_module(nn.Conv2d)
class QConv2d(QuantizedWeightModule, nn.Conv2d):
    """``nn.Conv2d`` (or any subclass, e.g. detectron2's ``Conv2d`` with ``norm``/``activation``) with a
    quantized input and weight. Create with :meth:`from_float` or :func:`model_quantization.convert`."""

    weight_channel_axis = 0


@register_quantized_module(nn.ConvTranspose2d)
class QConvTranspose2d(QuantizedWeightModule, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with a quantized input and weight (Mask R-CNN's mask-head upsampling).

    The weight is laid out ``(in, out / groups, kH, kW)``, so per-channel scales are along axis 1.
    """

    weight_channel_axis = 1


@register_quantized_module(nn.Linear)
class QLinear(QuantizedWeightModule, nn.Linear):
    """``nn.Linear`` with a quantized input and weight."""

    weight_channel_axis = 0
