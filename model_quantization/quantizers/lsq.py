"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020), with the optional LSQ+ offset."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from model_quantization import functional as F
from model_quantization.quantizers.base import (
    MIN_STEP,
    QUANTIZERS,
    GridUnavailable,
    IntegerGrid,
    Quantizer,
)
from model_quantization.quantizers.estimators import mse_step, percentile_step
from model_quantization.quantizers.recipe import DataDrivenOptions, QuantizerRecipe
from model_quantization.registry import did_you_mean

__all__ = ["INIT_METHODS", "LSQOptions", "LSQQuantizer", "integer_grid"]

INIT_METHODS = ("mean_abs", "mse", "percentile")


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


def step_grid(quantizer: Quantizer, step: torch.Tensor) -> IntegerGrid:
    """The :class:`IntegerGrid` of an LSQ-style quantizer (``clamp(round(x / step), -Qn, Qp) * step``)."""
    qn, qp, sign_grid = integer_grid(quantizer.bits, quantizer.signed)
    return IntegerGrid(
        scale=step.detach().clamp_min(MIN_STEP),
        qmin=-qn,
        qmax=qp,
        axis=quantizer._state_axis(),
        rounding="sign" if sign_grid else "nearest",
    )


@dataclass(frozen=True)
class LSQOptions(DataDrivenOptions):
    """Options of :class:`LSQQuantizer`.

    Attributes:
        grad_scale: apply the gradient scale g.
        init_value: initial step; when given, no data-driven initialisation takes place.
        init_batches: number of first batches whose estimates ``2 * mean(|x|) / sqrt(Qp)`` are averaged
            into the initial step.
        learnable_offset: LSQ+ (Bhalgat et al., 2020) learnable offset ``b``:
            ``q = clamp(round((x - b) / s), -Qn, Qp) * s + b``, for signed activations. Initialised to 0.
        init_method: how a batch estimates the initial step: ``"mean_abs"`` (the paper's
            ``2 mean|x| / sqrt(Qp)``), ``"mse"`` (the step with the least mean squared quantization error,
            :func:`~model_quantization.quantizers.estimators.mse_step`) or ``"percentile"`` (the
            ``init_percentile``-th percentile of ``|x|`` at the top of the grid).
        init_percentile: the percentile of ``init_method: percentile``, in (50, 100].
    """

    grad_scale: bool = True
    init_value: float | None = None
    learnable_offset: bool = False
    init_method: str = "mean_abs"
    init_percentile: float = 99.99

    def check(self, recipe: QuantizerRecipe, role: str) -> None:
        super().check(recipe, role)
        if self.init_value is not None and not self.init_value > 0:
            raise ValueError(f"init_value: must be > 0, got {self.init_value!r}")
        if self.init_method not in INIT_METHODS:
            raise ValueError(
                f"init_method: unknown method {self.init_method!r}: {did_you_mean(self.init_method, INIT_METHODS)}"
            )
        if not 50.0 < self.init_percentile <= 100.0:
            raise ValueError(f"init_percentile: must be in (50, 100], got {self.init_percentile!r}")
        if self.learnable_offset and not (recipe.signed and role == "activation"):
            raise ValueError("learnable_offset: LSQ+ applies to signed activations only")


@QUANTIZERS.register("lsq")
class LSQQuantizer(Quantizer):
    """Learned step size: ``q = clamp(round(x / s), -Qn, Qp) * s`` with a learnable step ``s``.

    The step gradient is the paper's (eq. 3): ``-x/s + round(x/s)`` inside the range, ``-Qn``/``Qp``
    outside, scaled by ``g = 1 / sqrt(N * Qp)`` where N is the number of weights per step (the whole
    tensor, or one output channel) for weights, and the number of features per example
    (``x.numel() / x.shape[0]``) for activations. Options: :class:`LSQOptions`.
    """

    Options = LSQOptions
    data_driven = True
    exact_codes = True

    def _create_state(self) -> None:
        self.qn, self.qp, self.sign_grid = integer_grid(self.bits, self.signed)
        self.step = nn.Parameter(torch.ones(self._state_shape()))
        offset = nn.Parameter(torch.zeros(self._state_shape())) if self.options.learnable_offset else None
        self.register_parameter("offset", offset)
        if self.options.init_value is not None:
            self.step.data.fill_(self.options.init_value)
            self.initialized.fill_(True)

    def gradient_scale(self, x: torch.Tensor) -> float:
        """LSQ's g = 1 / sqrt(N * Qp) for this input (1.0 when ``grad_scale`` is off)."""
        if not self.options.grad_scale:
            return 1.0
        if self.role == "weight":
            n = x.numel() // (self.num_channels or 1)
        else:
            n = x.numel() // x.shape[0] if x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(max(n, 1) * self.qp)

    def _initial_values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        method = self.options.init_method
        if self.sign_grid:  # {-s, +s}: mean|x| is the least-squares scale whatever the method
            step = self._mean_abs(x)
        elif method == "mse":
            step = mse_step(x, self.qn, self.qp, self._per_channel_axis(x))
        elif method == "percentile":
            step = percentile_step(x, self.qp, self.options.init_percentile, self._per_channel_axis(x))
        else:
            step = 2.0 * self._mean_abs(x) / math.sqrt(self.qp)
        # A dead input (all zeros) must not produce a zero step (division by zero downstream).
        return {"step": step.clamp_min(MIN_STEP)}

    def _degenerate(self, estimates: dict[str, torch.Tensor]) -> torch.Tensor:
        # Every estimator gives 0 for all-zero data, clamped to MIN_STEP above.
        return estimates["step"] <= MIN_STEP

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

    def integer_grid(self, x: torch.Tensor | None = None) -> IntegerGrid:
        self._check_grid_ready()
        if self.offset is not None:
            raise GridUnavailable(
                f"lsq quantizer{self._where()} has an LSQ+ offset, a float shift that is not an integer zero "
                f"point"
            )
        return step_grid(self, self.step)
