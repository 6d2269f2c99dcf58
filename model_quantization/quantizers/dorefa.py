"""DoReFa-Net quantization (Zhou et al., 2016)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_quantization import functional as F
from model_quantization.quantizers.base import QUANTIZERS, GridUnavailable, IntegerGrid, Quantizer
from model_quantization.quantizers.recipe import QuantizerOptions, QuantizerRecipe

__all__ = ["DoReFaOptions", "DoReFaQuantizer", "mean_abs_sign_grid"]


@dataclass(frozen=True)
class DoReFaOptions(QuantizerOptions):
    """Options of :class:`DoReFaQuantizer`.

    Attributes:
        clip: upper clipping bound of activations (the paper's 1.0).
    """

    clip: float = 1.0

    def check(self, recipe: QuantizerRecipe, role: str) -> None:
        if not self.clip > 0:
            raise ValueError(f"clip: must be a number > 0, got {self.clip!r}")


def mean_abs_sign_grid(quantizer: Quantizer, w: torch.Tensor) -> IntegerGrid:
    """Grid of ``sign(w) * mean|w|`` weights (XNOR-Net, 1-bit DoReFa): codes +-1, scale mean|w|."""
    axis = quantizer._per_channel_axis(w)
    dims = [d for d in range(w.dim()) if d != axis]
    scale = w.detach().abs().mean(dim=dims) if axis is not None else w.detach().abs().mean()
    return IntegerGrid(scale=scale, qmin=-1, qmax=1, axis=axis, rounding="sign")


@QUANTIZERS.register("dorefa")
class DoReFaQuantizer(Quantizer):
    """Weights through tanh normalisation to [-1, 1]; activations clipped to [0, clip]. Stateless.

    Weights (``bits > 1``): ``t = tanh(w) / (2 max|tanh(w)|) + 1/2``, ``q = 2 round((2^b-1) t) / (2^b-1) - 1``,
    so the ``2**bits`` levels span [-1, 1] (the max is per tensor or per output channel).
    Weights (``bits == 1``): ``sign(w) * mean(|w|)``.
    Activations: ``q = round(clamp(x, 0, clip) * (2^b - 1) / clip) * clip / (2^b - 1)``, straight-through
    gradient inside ``[0, clip)``. Options: :class:`DoReFaOptions`.
    """

    Options = DoReFaOptions
    signedness = {"weight": (True,), "activation": (False,)}

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "weight":
            return F.dorefa_weight(x, self.bits, self._per_channel_axis(x))
        return F.clip_fake_quant(x, self.options.clip, 2**self.bits - 1)

    def integer_grid(self, x: torch.Tensor | None = None) -> IntegerGrid:
        self._check_grid_ready()
        levels = 2**self.bits - 1
        if self.role == "activation":
            return IntegerGrid(scale=torch.tensor(self.options.clip / levels), qmin=0, qmax=levels)
        if x is None:
            raise GridUnavailable(f"dorefa weight quantizer{self._where()}: its grid depends on the weight")
        if self.bits == 1:
            return mean_abs_sign_grid(self, x)
        # Levels -1 + 2k / L (k = 0..L, L = 2^b - 1) are the odd integers -L..L times 1 / L.
        return IntegerGrid(scale=torch.tensor(1.0 / levels), qmin=-levels, qmax=levels)
