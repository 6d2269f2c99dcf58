"""PACT: Parameterized Clipping Activation (Choi et al., 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model_quantization import functional as F
from model_quantization.quantizers.base import QUANTIZERS, IntegerGrid, Quantizer
from model_quantization.quantizers.recipe import DataDrivenOptions, QuantizerRecipe

__all__ = ["PACTOptions", "PACTQuantizer"]


@dataclass(frozen=True)
class PACTOptions(DataDrivenOptions):
    """Options of :class:`PACTQuantizer`.

    Attributes:
        init_value: initial alpha (the paper's 10.0). ``None`` initialises alpha from the data instead:
            the mean over the first ``init_batches`` batches of the per-batch maximum.
        init_batches: batches used by the data-driven initialisation.
    """

    init_value: float | None = 10.0

    def check(self, recipe: QuantizerRecipe, role: str) -> None:
        super().check(recipe, role)
        if self.init_value is not None and not self.init_value > 0:
            raise ValueError(f"init_value: must be > 0, got {self.init_value!r}")


@QUANTIZERS.register("pact")
class PACTQuantizer(Quantizer):
    """Activations clipped to a learnable ``[0, alpha]`` and quantized uniformly to ``2**bits`` levels.

    ``y = clamp(x, 0, alpha)``, ``q = round(y * (2^b - 1) / alpha) * alpha / (2^b - 1)``. The clip gets the
    paper's gradient ``dq/dalpha = 1[x >= alpha]``; the input gets ``1[0 <= x < alpha]``. Regularise alpha
    with weight decay in the optimiser, as in the paper. Weights are not PACT's business: pair it with
    ``dorefa`` or ``lsq`` weights. Options: :class:`PACTOptions`.
    """

    Options = PACTOptions
    roles = ("activation",)
    signedness = {"activation": (False,)}
    data_driven = True

    def _create_state(self) -> None:
        self.levels = 2**self.bits - 1
        init_value = self.options.init_value
        self.alpha = nn.Parameter(torch.tensor(1.0 if init_value is None else init_value))
        if init_value is not None:
            self.initialized.fill_(True)

    def _initial_values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"alpha": x.max().clamp_min(torch.finfo(torch.float32).eps)}

    def _degenerate(self, estimates: dict[str, torch.Tensor]) -> torch.Tensor:
        return estimates["alpha"] <= torch.finfo(torch.float32).eps  # no positive value: all zeros

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return F.pact_fake_quant(x, self.alpha.to(x.dtype), self.levels)

    def integer_grid(self, x: torch.Tensor | None = None) -> IntegerGrid:
        self._check_grid_ready()
        return IntegerGrid(scale=(self.alpha.detach() / self.levels).reshape(()), qmin=0, qmax=self.levels)
