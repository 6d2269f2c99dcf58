"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020), with the optional LSQ+ offset."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from model_quantization import functional as F
from model_quantization.quantizers.base import QUANTIZERS, Quantizer


def integer_grid(bits: int, signed: bool) -> tuple[int, int, bool]:
    """(Qn, Qp, sign_grid) of the LSQ integer grid ``[-Qn, Qp]``.

    Signed: ``Qn = 2^(b-1)``, ``Qp = 2^(b-1) - 1`` (the paper). Unsigned: ``Qn = 0``, ``Qp = 2^b - 1``.
    Signed 1-bit would give the lopsided grid {-1, 0}; it uses the symmetric binary grid {-1, +1}
    (``sign_grid``) instead, with ``Qn = Qp = 1``.
    """
    if not signed:
        return 0, 2**bits - 1, False
    if bits == 1:
        return 1, 1, True
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1, False


@QUANTIZERS.register("lsq")
class LSQQuantizer(Quantizer):
    """Learned step size: ``q = clamp(round(x / s), -Qn, Qp) * s`` with a learnable step ``s``.

    The step gradient is the paper's (eq. 3): ``-x/s + round(x/s)`` inside the range, ``-Qn``/``Qp``
    outside, scaled by ``g = 1 / sqrt(N * Qp)`` where N is the number of weights per step (the whole
    tensor, or one output channel) for weights, and the number of features per example
    (``x.numel() / x.shape[0]``) for activations.

    Options:
        grad_scale: apply the gradient scale g (default True).
        init_value: initial step; when given, no data-driven initialisation takes place.
        init_batches: number of first batches whose estimates ``2 * mean(|x|) / sqrt(Qp)`` are averaged
            into the initial step (default 1).
        learnable_offset: LSQ+ (Bhalgat et al., 2020) learnable offset ``b``:
            ``q = clamp(round((x - b) / s), -Qn, Qp) * s + b``, for signed activations. Initialised to 0.
    """

    method = "lsq"
    data_driven = True

    def __init__(
        self,
        bits: int | None = 4,
        signed: bool = True,
        granularity: str = "per_tensor",
        role: str = "activation",
        channel_axis: int = 0,
        num_channels: int | None = None,
        *,
        grad_scale: bool = True,
        init_value: float | None = None,
        init_batches: int = 1,
        learnable_offset: bool = False,
    ) -> None:
        super().__init__(
            bits, signed, granularity, role, channel_axis, num_channels,
            grad_scale=grad_scale, init_value=init_value, init_batches=init_batches,
            learnable_offset=learnable_offset,
        )  # fmt: skip
        self.grad_scale = grad_scale
        self.init_batches = init_batches
        self.learnable_offset = learnable_offset
        if bits is None:
            return
        self.qn, self.qp, self.sign_grid = integer_grid(bits, signed)
        self.step = nn.Parameter(torch.ones(self._state_shape()))
        self.register_parameter(
            "offset", nn.Parameter(torch.zeros(self._state_shape())) if learnable_offset else None
        )
        if init_value is not None:
            self.step.data.fill_(init_value)
            self.initialized.fill_(True)

    @classmethod
    def check_options(cls, bits, signed, granularity, role, init_value=None, init_batches=1,
                      learnable_offset=False, **_):  # fmt: skip
        if init_value is not None and not init_value > 0:
            raise ValueError(f"lsq: init_value must be > 0, got {init_value!r}")
        if not isinstance(init_batches, int) or init_batches < 1:
            raise ValueError(f"lsq: init_batches must be an integer >= 1, got {init_batches!r}")
        if learnable_offset and not (signed and role == "activation"):
            raise ValueError("lsq: learnable_offset (LSQ+) applies to signed activations only")

    def gradient_scale(self, x: torch.Tensor) -> float:
        """LSQ's g = 1 / sqrt(N * Qp) for this input (1.0 when ``grad_scale`` is off)."""
        if not self.grad_scale:
            return 1.0
        if self.role == "weight":
            n = x.numel() // (self.num_channels or 1)
        else:
            n = x.numel() // x.shape[0] if x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(max(n, 1) * self.qp)

    def _initial_values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mean_abs = self._mean_abs(x)
        # A dead input (all zeros) must not produce a zero step (division by zero downstream).
        step = (2.0 * mean_abs / math.sqrt(self.qp)).clamp_min(torch.finfo(torch.float32).tiny * 1e3)
        return {"step": step}

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast or in a half-precision model the input may not be float32: quantize in its dtype.
        return F.lsq_fake_quant(
            x,
            self.step.to(x.dtype),
            self.qn,
            self.qp,
            sign_grid=self.sign_grid,
            grad_scale=self.gradient_scale(x),
            offset=None if self.offset is None else self.offset.to(x.dtype),
            channel_axis=self._per_channel_axis(x),
        )

    def compact(self, out: torch.Tensor) -> Any | None:
        """``out`` as int8/uint8 codes plus the step (and offset): ``out == codes * step (+ offset)`` exactly."""
        if self.bits is None or self.bits > 8 or self.granularity != "per_tensor":
            return None
        step = self.step.detach().to(out.dtype)
        offset = None if self.offset is None else self.offset.detach().to(out.dtype)
        levels = (out - offset) / step if offset is not None else out / step
        codes = torch.round(levels).to(torch.int8 if self.qn > 0 else torch.uint8)
        return codes, step.clone(), None if offset is None else offset.clone(), out.dtype

    def expand(self, packed: Any) -> torch.Tensor:
        codes, step, offset, dtype = packed
        # The same float operations as the forward pass (q * s + b), hence the same bits.
        out = codes.to(dtype) * step
        return out + offset if offset is not None else out

    def repr_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {} if self.grad_scale else {"grad_scale": False}
        return options | ({"learnable_offset": True} if self.learnable_offset else {})
