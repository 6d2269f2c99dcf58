"""Quantized modules and the float helper modules conversion relies on.

See :mod:`model_quantization.nn.base` for how conversion keeps the float module's class, attributes and
parameter names.
"""

from model_quantization.nn.add import Add, QAdd, QuantizedSumModule, QWeightedAdd, WeightedAdd
from model_quantization.nn.base import (
    QUANTIZED_MODULES,
    QuantizedModule,
    QuantizedWeightModule,
    quantized_class,
    quantized_module_for,
    register_quantized_module,
)
from model_quantization.nn.dynamic import DynamicConv2d, QDynamicConv2d
from model_quantization.nn.layers import QConv2d, QConvTranspose2d, QLinear

__all__ = [
    "QUANTIZED_MODULES",
    "Add",
    "DynamicConv2d",
    "QAdd",
    "QConv2d",
    "QConvTranspose2d",
    "QDynamicConv2d",
    "QLinear",
    "QWeightedAdd",
    "QuantizedModule",
    "QuantizedSumModule",
    "QuantizedWeightModule",
    "WeightedAdd",
    "quantized_class",
    "quantized_module_for",
    "register_quantized_module",
]
