"""DoReFa-Net quantization (Zhou et al., 2016)."""

from __future__ import annotations

from typing import Any

import torch

from model_quantization import functional as F
from model_quantization.quantizers.base import QUANTIZERS, Quantizer


@QUANTIZERS.register("dorefa")
class DoReFaQuantizer(Quantizer):
    """Weights through tanh normalisation to [-1, 1]; activations clipped to [0, clip]. Stateless.

    Weights (``bits > 1``): ``t = tanh(w) / (2 max|tanh(w)|) + 1/2``, ``q = 2 round((2^b-1) t) / (2^b-1) - 1``,
    so the ``2**bits`` levels span [-1, 1] (the max is per tensor or per output channel).
    Weights (``bits == 1``): ``sign(w) * mean(|w|)``.
    Activations: ``q = round(clamp(x, 0, clip) * (2^b - 1) / clip) * clip / (2^b - 1)``, straight-through
    gradient inside ``[0, clip)``.

    Options:
        clip: upper clipping bound of activations (default 1.0, the paper's).
    """

    method = "dorefa"
    signedness = {"weight": (True,), "activation": (False,)}

    def __init__(
        self,
        bits: int | None = 4,
        signed: bool = False,
        granularity: str = "per_tensor",
        role: str = "activation",
        channel_axis: int = 0,
        num_channels: int | None = None,
        *,
        clip: float = 1.0,
    ) -> None:
        super().__init__(bits, signed, granularity, role, channel_axis, num_channels, clip=clip)
        self.clip = float(clip)

    @classmethod
    def check_options(cls, bits, signed, granularity, role, clip=1.0, **_):
        if not (isinstance(clip, int | float) and clip > 0):
            raise ValueError(f"dorefa: clip must be a number > 0, got {clip!r}")

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "weight":
            return F.dorefa_weight(x, self.bits, self._per_channel_axis(x))
        return F.clip_fake_quant(x, self.clip, 2**self.bits - 1)

    def repr_options(self) -> dict[str, Any]:
        return {"clip": self.clip} if self.role == "activation" else {}
