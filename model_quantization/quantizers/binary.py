"""Binary weights and activations: XNOR-Net scaling, Bi-Real Net's approximate sign gradient."""

from __future__ import annotations

from typing import Any

import torch

from model_quantization import functional as F
from model_quantization.quantizers.base import QUANTIZERS, Quantizer
from model_quantization.registry import did_you_mean

BACKWARDS = ("ste", "bireal")


@QUANTIZERS.register("binary")
class BinaryQuantizer(Quantizer):
    """1-bit quantization to {-1, +1} (times a scale for weights). Stateless.

    Weights: XNOR-Net, ``sign(w) * mean(|w|)`` with the mean per output channel (``per_channel``) or per
    tensor; the scale is differentiated and sign gets the straight-through gradient clipped to |w| <= 1.
    Activations: ``sign(x)`` with Bi-Real Net's ApproxSign gradient ``2 - 2|x|`` on |x| < 1
    (``backward="bireal"``, the default) or the clipped straight-through gradient ``1[|x| <= 1]``
    (``backward="ste"``). sign(0) is +1, so there are exactly two levels.

    Options:
        backward: ``"bireal"`` or ``"ste"``; activations only (weights always use clipped STE).
    """

    method = "binary"
    bit_range = (1, 1)
    signedness = {"weight": (True,), "activation": (True,)}

    def __init__(
        self,
        bits: int | None = 1,
        signed: bool = True,
        granularity: str = "per_tensor",
        role: str = "activation",
        channel_axis: int = 0,
        num_channels: int | None = None,
        *,
        backward: str = "bireal",
    ) -> None:
        super().__init__(bits, signed, granularity, role, channel_axis, num_channels, backward=backward)
        self.backward = backward

    @classmethod
    def check_options(cls, bits, signed, granularity, role, backward="bireal", **_):
        if backward not in BACKWARDS:
            raise ValueError(
                f"binary: unknown backward {backward!r}: {did_you_mean(str(backward), BACKWARDS)}"
            )

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "weight":
            return F.xnor_weight(x, self._per_channel_axis(x))
        return F.bireal_sign(x) if self.backward == "bireal" else F.sign_ste(x, clip=1.0)

    def repr_options(self) -> dict[str, Any]:
        return {"backward": self.backward} if self.role == "activation" else {}
