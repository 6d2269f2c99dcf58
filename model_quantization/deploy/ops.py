"""Quantize/dequantize as PyTorch custom ops, and the ONNX each one becomes (the export route).

Why custom ops: torch 2.14's exporters cannot emit sub-8-bit Q/DQ from PyTorch's own fake-quant ops. The
TorchScript route (``dynamo=False``) refuses any range other than (0, 127), (0, 255) and (-128, 127), and
the dynamo route has no translation for ``fake_quantize_*`` (pytorch/pytorch#167063). So the lowered network
calls two ops of our own, registered with :mod:`torch.library` (so ``torch.export`` keeps them as single
nodes), and :data:`TRANSLATIONS` tells ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``
which standard ONNX nodes each becomes (the pattern Brevitas uses):

* :func:`quantize_dequantize` -> ``QuantizeLinear -> Clip -> DequantizeLinear``. The Clip is integer (on the
  uint8/int8 codes) and only there when the grid is narrower than its 8-bit container (b < 8 bits); it sits
  between Q and DQ so that ONNX Runtime still sees "Q after the conv" and fuses ``DQ -> Conv -> Q``.
* :func:`dequantize` -> ``DequantizeLinear`` of integer codes stored as an int8 initializer (weights).

The eager implementations compute what those ONNX nodes compute (round half to even, saturate to the
container, clip, rescale); they exist so that ``torch.export`` can trace and so that a lowered network can
run in PyTorch, but parity is always measured against the fake-quant model, never against them.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import numpy_helper
from onnxscript import opset18 as op

__all__ = ["LIBRARY", "TRANSLATIONS", "dequantize", "quantize_dequantize"]

#: Namespace of our custom ops (never reaches the ONNX file: every op has a translation).
LIBRARY = "model_quantization_deploy"

_CONTAINERS = {True: (np.int8, torch.int8), False: (np.uint8, torch.uint8)}


@torch.library.custom_op(f"{LIBRARY}::quantize_dequantize", mutates_args=())
def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: int, low: int, high: int, signed: bool
) -> torch.Tensor:
    """``(clip(round(x / scale) + zero_point, low, high) - zero_point) * scale`` in an 8-bit container.

    Args:
        x: float tensor.
        scale: 0-d float32 tensor (per-tensor activation scale).
        zero_point: integer code of 0.0 in the container.
        low, high: clip range of the codes, inside the container's range.
        signed: container type, int8 (True) or uint8 (False).
    """
    container = (-128, 127) if signed else (0, 255)
    codes = torch.round(x / scale) + zero_point
    codes = codes.clamp(max(low, container[0]), min(high, container[1]))
    return (codes - zero_point) * scale


@quantize_dequantize.register_fake
def _(x, scale, zero_point, low, high, signed):
    return torch.empty_like(x)


@torch.library.custom_op(f"{LIBRARY}::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """``codes * scale`` (zero point 0) as float32, ``scale`` a vector along ``axis`` of ``codes``."""
    shape = [1] * codes.dim()
    shape[axis] = -1
    return codes.to(torch.float32) * scale.reshape(shape)


@dequantize.register_fake
def _(codes, scale, axis):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def _constant(value: int, signed: bool):
    return op.Constant(value=numpy_helper.from_array(np.array(value, dtype=_CONTAINERS[signed][0])))


def _onnx_quantize_dequantize(x, scale, zero_point: int, low: int, high: int, signed: bool):
    zp = _constant(zero_point, signed)
    codes = op.QuantizeLinear(x, scale, zp)
    container = (-128, 127) if signed else (0, 255)
    if (low, high) != container:
        codes = op.Clip(codes, _constant(low, signed), _constant(high, signed))
    return op.DequantizeLinear(codes, scale, zp)


def _onnx_dequantize(codes, scale, axis: int):
    return op.DequantizeLinear(codes, scale, axis=axis)


#: ``custom_translation_table`` for ``torch.onnx.export``: our ops -> standard ONNX (opset 18) nodes.
TRANSLATIONS = {
    torch.ops.model_quantization_deploy.quantize_dequantize.default: _onnx_quantize_dequantize,
    torch.ops.model_quantization_deploy.dequantize.default: _onnx_dequantize,
}
