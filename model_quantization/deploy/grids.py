"""From a quantizer's integer grid to what the ONNX graph stores: activation Q/DQ parameters, weight codes.

Everything here reads the public grid contract (:meth:`Quantizer.integer_grid`, :class:`IntegerGrid`) and
the public quantizer properties; nothing reaches into a quantizer's state. A quantizer that cannot state a
grid (:class:`GridUnavailable`: LQ-Net's non-uniform levels, an LSQ+ offset, never-initialised state) or
whose grid does not fit an 8-bit container makes the export fail with :class:`ExportError`, naming the
module and why.

Containers. Activations always travel as **uint8**: an unsigned b-bit grid ``[0, 2^b - 1]`` with zero
point 0 (a ReLU before it is then free: ONNX Runtime drops it), a signed grid ``[-2^(b-1), 2^(b-1) - 1]``
shifted by 128 (zero point 128, codes ``[128 - 2^(b-1), 127 + 2^(b-1)]``), which is the same grid bit for
bit and avoids ONNX Runtime's slow S8S8 convolutions. Below 8 bits a Clip keeps the codes on the b-bit grid.
Weights are **int8** codes on the b-bit grid (4-bit weights are integers in [-8, 7] stored in int8), one
scale per output channel once a norm is folded in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from model_quantization.quantizers import GridUnavailable, IntegerGrid, Quantizer

__all__ = [
    "SAFE_INT8_CODE",
    "WIDE_CODE",
    "ActivationQDQ",
    "ExportError",
    "WeightCodes",
    "activation_qdq",
    "integer_bias",
    "spread_factors",
    "weight_codes",
]

#: Largest |weight code| that an int8 container keeps: ONNX Runtime's U8S8 kernels without VNNI add pairs
#: of uint8 x int8 products in int16 with saturation, exact only while ``2 * 255 * |w| <= 32767``.
SAFE_INT8_CODE = 64
#: Largest |weight code| of the uint8 container (codes + 128).
WIDE_CODE = 127


class ExportError(ValueError):
    """The model cannot be exported as asked; the message names the module and the reason."""


@dataclass(frozen=True)
class ActivationQDQ:
    """How one activation quantizer is written: ``QuantizeLinear -> [Clip] -> DequantizeLinear``.

    Attributes:
        name: qualified name of the quantizer (``<module>.input_quantizer``), for reports and parity taps.
        scale: the step, a float32 scalar.
        zero_point: container code of 0.0.
        low, high: the container codes of the grid's ends (the Clip range when narrower than 0..255).
        sign: binary grids (``rounding == "sign"``): ``x >= 0`` maps to ``+scale`` and ``x < 0`` to
            ``-scale`` (there is no zero level), written as ``Where`` before the Q/DQ.
        bits: the quantizer's bit width, for reports.
    """

    name: str
    scale: float
    zero_point: int
    low: int
    high: int
    sign: bool = False
    bits: int = 8


def _grid(quantizer: Quantizer, name: str, x: torch.Tensor | None = None) -> IntegerGrid:
    try:
        return quantizer.integer_grid(x)
    except GridUnavailable as exc:
        raise ExportError(f"cannot export {name!r}: {exc}") from None


def activation_qdq(quantizer: Quantizer, name: str) -> ActivationQDQ | None:
    """The Q/DQ parameters of an activation quantizer; None when it is off (the identity)."""
    if not quantizer.enabled:
        return None
    grid = _grid(quantizer, name)
    if grid.axis is not None or grid.scale.numel() != 1:
        raise ExportError(f"cannot export {name!r}: a per-channel activation grid has no integer convolution")
    low, high = grid.qmin - grid.zero_point, grid.qmax - grid.zero_point  # relative to the code of 0.0
    offset = 0 if low >= 0 else 128
    if low + offset < 0 or high + offset > 255:
        raise ExportError(
            f"cannot export {name!r}: its integer range [{grid.qmin}, {grid.qmax}] does not fit an 8-bit container"
        )
    scale = float(grid.scale.reshape(()))
    if not scale > 0:
        raise ExportError(f"cannot export {name!r}: its step is {scale}, not a positive number")
    return ActivationQDQ(
        name=name,
        scale=scale,
        zero_point=offset,
        low=low + offset,
        high=high + offset,
        sign=grid.rounding == "sign",
        bits=quantizer.bits,
    )


@dataclass
class WeightCodes:
    """A quantized weight as int8 codes and one scale per output channel: ``weight == codes * scale``.

    Attributes:
        codes: int8 tensor shaped like the weight.
        scale: float32 vector, one step per output channel (along ``axis``).
        axis: the weight's output-channel axis.
        qmin, qmax: the grid's integer range (the codes may use a subset).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    axis: int
    qmin: int
    qmax: int

    def dequantize(self) -> torch.Tensor:
        shape = [1] * self.codes.dim()
        shape[self.axis] = -1
        return self.codes.to(torch.float32) * self.scale.reshape(shape)


@torch.no_grad()
def weight_codes(quantizer: Quantizer, weight: torch.Tensor, axis: int, name: str) -> WeightCodes:
    """Integer codes and per-output-channel scales of ``quantizer(weight)``, checked to reproduce it.

    The codes come from the quantizer's own output (``IntegerGrid.codes``), so they are exactly what
    fake-quant trained with; nothing is re-rounded from the float weight.
    """
    grid = _grid(quantizer, name, weight.detach())
    quantized = quantizer(weight.detach()).to(torch.float32)
    codes = grid.codes(quantized)
    if grid.rounding == "sign":  # a channel whose scale is 0 (all-zero weights) has codes 0/0
        codes = torch.nan_to_num(codes, nan=0.0)
    codes = codes - grid.zero_point
    low, high = grid.qmin - grid.zero_point, grid.qmax - grid.zero_point
    if low < -128 or high > 127:
        raise ExportError(
            f"cannot export {name!r}: {quantizer.method} {quantizer.bits}-bit weight codes span [{low}, {high}], "
            f"which does not fit int8"
        )
    if codes.numel() and (codes.min() < low or codes.max() > high):
        raise ExportError(f"cannot export {name!r}: the quantized weight is not on its stated grid")
    channels = weight.shape[axis]
    if grid.axis is None:
        scale = grid.scale.detach().to(torch.float32).reshape(()).expand(channels).clone()
    elif grid.axis == axis:
        scale = grid.scale.detach().to(torch.float32).reshape(channels).clone()
    else:
        raise ExportError(
            f"cannot export {name!r}: its grid is per channel along axis {grid.axis}, not {axis}"
        )
    result = WeightCodes(codes=codes.to(torch.int8), scale=scale, axis=axis, qmin=low, qmax=high)
    error = (result.dequantize() - quantized).abs().max() if quantized.numel() else torch.tensor(0.0)
    if error > 1e-5 * max(float(quantized.abs().max()), 1e-12):
        raise ExportError(
            f"cannot export {name!r}: codes x scale differ from the quantized weight by {float(error):.3g}"
        )
    return result


def output_channel_axis(module: nn.Module) -> int:
    """The output-channel axis of a quantized module's weight (0 for conv/linear)."""
    return getattr(module, "weight_channel_axis", 0)


def spread_factors(peak: torch.Tensor, limit: int) -> torch.Tensor:
    """Per output channel, the largest power of two ``k`` with ``k * peak <= limit`` (1 if none).

    ``peak`` is each channel's largest |weight code|. The export multiplies the codes by ``k`` and divides
    the scale by it (:func:`~.onnx_passes.store_weights`), which makes the int32 bias of integer kernels
    ``k`` times finer; :func:`integer_bias` rounds biases with the same rule.
    """
    peak = peak.to(torch.float64)
    k = torch.ones_like(peak, dtype=torch.int64)
    ok = (peak > 0) & (peak <= limit)
    k[ok] = (2 ** torch.floor(torch.log2(limit / peak[ok]))).to(torch.int64)
    return k


def grid_spread(qmin: int, qmax: int) -> int:
    """The spread :func:`~.onnx_passes.store_weights` gives *at least* to any channel of weights on the grid
    ``[qmin, qmax]`` (relative to the zero point) with its default ``auto`` container: the rule applied to
    the grid's largest |code|. A channel whose codes use less of the grid gets a larger power of two, and
    the ``int8``/``uint8`` containers never a smaller one, so a bias on this spread's grid is exact there."""
    peak = max(abs(qmin), abs(qmax))
    limit = SAFE_INT8_CODE if peak <= SAFE_INT8_CODE else WIDE_CODE
    # spread_factors' rule in plain Python: no tensor, so that it traces under torch.compile
    return 2 ** math.floor(math.log2(limit / peak)) if 0 < peak <= limit else 1


def integer_bias(
    bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor, spread: int
) -> torch.Tensor:
    """``bias`` rounded to the int32 grid on which integer kernels add it: ``s_x * |s_w| / spread`` per channel.

    QLinearConv and ConvInteger accumulate ``x codes * w codes`` in int32 and add the bias in the same units;
    ONNX Runtime rounds a float bias to them when it fuses a conv. A bias already on that grid is added
    exactly, so the fake-quant model, the Q/DQ graph and the integer engine compute the same thing.

    Args:
        bias: per output channel, after any folded norm (float32).
        input_scale: the conv input's step (float32 scalar).
        weight_scale: per output channel, after any folded norm (float32; may be negative).
        spread: :func:`grid_spread` of the weight grid.
    """
    step = (input_scale * weight_scale).abs() / spread  # / a power of two: exact, like ONNX Runtime's
    return torch.round(bias / step) * step
