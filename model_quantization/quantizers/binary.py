"""Binary weights and activations: XNOR-Net scaling, Bi-Real Net's approximate sign gradient."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_quantization import functional as F
from model_quantization.quantizers.base import QUANTIZERS, GridUnavailable, IntegerGrid, Quantizer
from model_quantization.quantizers.dorefa import mean_abs_sign_grid
from model_quantization.quantizers.recipe import QuantizerOptions, QuantizerRecipe
from model_quantization.registry import did_you_mean

__all__ = ["BACKWARDS", "BinaryOptions", "BinaryQuantizer"]

BACKWARDS = ("ste", "bireal")


@dataclass(frozen=True)
class BinaryOptions(QuantizerOptions):
    """Options of :class:`BinaryQuantizer`.

    Attributes:
        backward: ``"bireal"`` or ``"ste"``; activations only (weights always use clipped STE).
    """

    backward: str = "bireal"

    def check(self, recipe: QuantizerRecipe, role: str) -> None:
        if self.backward not in BACKWARDS:
            raise ValueError(
                f"backward: unknown backward {self.backward!r}: {did_you_mean(self.backward, BACKWARDS)}"
            )


@QUANTIZERS.register("binary")
class BinaryQuantizer(Quantizer):
    """1-bit quantization to {-1, +1} (times a scale for weights). Stateless.

    Weights: XNOR-Net, ``sign(w) * mean(|w|)`` with the mean per output channel (``per_channel``) or per
    tensor; the scale is differentiated and sign gets the straight-through gradient clipped to |w| <= 1.
    Activations: ``sign(x)`` with Bi-Real Net's ApproxSign gradient ``2 - 2|x|`` on |x| < 1
    (``backward="bireal"``, the default) or the clipped straight-through gradient ``1[|x| <= 1]``
    (``backward="ste"``). sign(0) is +1, so there are exactly two levels. Options: :class:`BinaryOptions`.
    """

    Options = BinaryOptions
    bit_range = (1, 1)
    signedness = {"weight": (True,), "activation": (True,)}

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "weight":
            return F.xnor_weight(x, self._per_channel_axis(x))
        return F.bireal_sign(x) if self.options.backward == "bireal" else F.sign_ste(x, clip=1.0)

    def integer_grid(self, x: torch.Tensor | None = None) -> IntegerGrid:
        self._check_grid_ready()
        if self.role == "activation":
            return IntegerGrid(scale=torch.tensor(1.0), qmin=-1, qmax=1, rounding="sign")
        if x is None:
            raise GridUnavailable(f"binary weight quantizer{self._where()}: its grid depends on the weight")
        return mean_abs_sign_grid(self, x)
