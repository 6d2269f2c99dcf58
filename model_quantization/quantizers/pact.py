"""PACT: Parameterized Clipping Activation (Choi et al., 2018)."""

from __future__ import annotations

import torch
from torch import nn

from model_quantization import functional as F
from model_quantization.quantizers.base import QUANTIZERS, Quantizer


@QUANTIZERS.register("pact")
class PACTQuantizer(Quantizer):
    """Activations clipped to a learnable ``[0, alpha]`` and quantized uniformly to ``2**bits`` levels.

    ``y = clamp(x, 0, alpha)``, ``q = round(y * (2^b - 1) / alpha) * alpha / (2^b - 1)``. The clip gets the
    paper's gradient ``dq/dalpha = 1[x >= alpha]``; the input gets ``1[0 <= x < alpha]``. Regularise alpha
    with weight decay in the optimiser, as in the paper. Weights are not PACT's business: pair it with
    ``dorefa`` or ``lsq`` weights.

    Options:
        init_value: initial alpha (default 10.0, the paper's). ``None`` initialises alpha from the data
            instead: the mean over the first ``init_batches`` batches of the per-batch maximum.
        init_batches: batches used by the data-driven initialisation (default 1).
    """

    method = "pact"
    roles = ("activation",)
    signedness = {"activation": (False,)}
    data_driven = True

    def __init__(
        self,
        bits: int | None = 4,
        signed: bool = False,
        granularity: str = "per_tensor",
        role: str = "activation",
        channel_axis: int = 0,
        num_channels: int | None = None,
        *,
        init_value: float | None = 10.0,
        init_batches: int = 1,
    ) -> None:
        super().__init__(
            bits, signed, granularity, role, channel_axis, num_channels,
            init_value=init_value, init_batches=init_batches,
        )  # fmt: skip
        self.init_batches = init_batches
        if bits is None:
            return
        self.levels = 2**bits - 1
        self.alpha = nn.Parameter(torch.tensor(1.0 if init_value is None else float(init_value)))
        if init_value is not None:
            self.initialized.fill_(True)

    @classmethod
    def check_options(cls, bits, signed, granularity, role, init_value=10.0, init_batches=1, **_):
        if init_value is not None and not init_value > 0:
            raise ValueError(f"pact: init_value must be > 0, got {init_value!r}")
        if not isinstance(init_batches, int) or init_batches < 1:
            raise ValueError(f"pact: init_batches must be an integer >= 1, got {init_batches!r}")

    def _initial_values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"alpha": x.max().clamp_min(torch.finfo(torch.float32).eps)}

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return F.pact_fake_quant(x, self.alpha.to(x.dtype), self.levels)
