"""Range observers for post-training quantization (PTQ) and calibration: min-max, moving average, percentile.

An observer quantizer records the range of what flows through it and fake-quantizes with the step that
maps that range onto the integer grid: ``step = max(|min|, |max|) / Qp`` (signed, grid ``[-Qn, Qp]``) or
``step = max / (2^b - 1)`` (unsigned, grid ``[0, 2^b - 1]``). It observes the first batch it sees in
training, and every batch while :attr:`~.base.Quantizer.calibrating` is on (for every quantizer of a model,
:func:`~.base.calibration`, in train or eval mode)::

    with calibration(model):          # observers update their ranges on every batch in here
        for images in calibration_set:
            model(images)
    model(images)                     # ranges frozen: plain fake quantization

The input gets the straight-through gradient inside the range; ranges are not learned. Ranges are
reduced over DDP ranks (min/max, or the mean for percentiles) so that every rank calibrates identically.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from model_quantization import functional as F
from model_quantization.distributed import all_reduce_max, all_reduce_mean, all_reduce_min
from model_quantization.quantizers.base import MIN_STEP, QUANTIZERS, IntegerGrid, Quantizer, calibration
from model_quantization.quantizers.estimators import mse_step
from model_quantization.quantizers.lsq import integer_grid, step_grid
from model_quantization.quantizers.recipe import QuantizerOptions, QuantizerRecipe

__all__ = [
    "EMAOptions",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "ObserverQuantizer",
    "PercentileObserver",
    "PercentileOptions",
    "MSEObserver",
    "calibration",
]

logger = logging.getLogger(__name__)


class ObserverQuantizer(Quantizer):
    """Base class: range buffers ``min_val``/``max_val``, the grid, and fake quantization from the range.

    Subclasses implement :meth:`batch_range` (the range estimate of one batch) and :meth:`combine` (how it
    merges with the stored range).
    """

    data_driven = True
    exact_codes = True

    def _create_state(self) -> None:
        self.qn, self.qp, self.sign_grid = integer_grid(self.bits, self.signed)
        self.register_buffer("min_val", torch.zeros(self._state_shape()))
        self.register_buffer("max_val", torch.zeros(self._state_shape()))

    def initialize(self, x: torch.Tensor) -> None:
        """The first batch, and every batch while :attr:`calibrating`, updates the range."""
        self.observe(x)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (groups, elements): one group per tensor or per channel."""
        axis = self._per_channel_axis(x)
        return x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) estimate of one batch, shaped like the state, already reduced over ranks."""
        grouped = self._grouped(x.detach()).to(self.min_val.dtype)
        low, high = grouped.amin(dim=1), grouped.amax(dim=1)
        return all_reduce_min(low), all_reduce_max(high)

    def combine(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Merge a batch range into the stored one (called after at least one batch was stored)."""
        raise NotImplementedError

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the stored range with one batch."""
        x = x.detach()
        self.refuse_non_finite_input(x)
        low, high = self.batch_range(x)
        low, high = low.reshape(self.min_val.shape), high.reshape(self.max_val.shape)
        self.refuse_non_finite_estimates({"min_val": low, "max_val": high}, x)
        seen = int(self.init_batches_seen)
        if seen == 0:
            dead = (low == 0) & (high == 0)
            if bool(dead.all()):  # an all-zero first batch: no range yet, wait for data
                self._defer(seen)
                return
            if bool(dead.any()) and not self._warned_degenerate:
                self._warned_degenerate = True
                logger.warning(
                    "%s quantizer%s: channels %s were all zeros in its first batch; their range is [0, 0]",
                    self.method, self._where(), dead.reshape(-1).nonzero().flatten().tolist(),
                )  # fmt: skip
        if seen == 0:
            self.min_val.copy_(low)
            self.max_val.copy_(high)
        else:
            self.combine(low, high)
        self.init_batches_seen.add_(1)
        self.initialized.fill_(True)
        self._known_initialized = True

    def step(self) -> torch.Tensor:
        """The step size implied by the stored range."""
        if self.signed:
            peak = torch.maximum(self.min_val.abs(), self.max_val.abs())
        else:
            peak = self.max_val.clamp_min(0.0)
        return (peak / self.qp).clamp_min(MIN_STEP)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        step = self.step().to(x.dtype)
        return F.lsq_fake_quant(
            x, step, self.qn, self.qp, sign_grid=self.sign_grid, channel_axis=self._per_channel_axis(x)
        )

    def integer_grid(self, x: torch.Tensor | None = None) -> IntegerGrid:
        self._check_grid_ready()
        return step_grid(self, self.step())


@dataclass(frozen=True)
class EMAOptions(QuantizerOptions):
    """Options of :class:`MovingAverageMinMaxObserver`.

    Attributes:
        momentum: weight of the new batch, ``range <- (1 - m) * range + m * batch`` (0.01, as in
            ``torch.ao.quantization.MovingAverageMinMaxObserver``).
    """

    momentum: float = 0.01

    def check(self, recipe: QuantizerRecipe, role: str) -> None:
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"momentum: must be in (0, 1], got {self.momentum!r}")


@dataclass(frozen=True)
class PercentileOptions(QuantizerOptions):
    """Options of :class:`PercentileObserver`.

    Attributes:
        percentile: upper percentile in (50, 100]; the lower one is ``100 - percentile``.
    """

    percentile: float = 99.99

    def check(self, recipe: QuantizerRecipe, role: str) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile: must be in (50, 100], got {self.percentile!r}")


@QUANTIZERS.register("minmax")
class MinMaxObserver(ObserverQuantizer):
    """Running minimum and maximum over all observed batches."""

    def combine(self, low: torch.Tensor, high: torch.Tensor) -> None:
        torch.minimum(self.min_val, low, out=self.min_val)
        torch.maximum(self.max_val, high, out=self.max_val)


@QUANTIZERS.register("ema_minmax")
class MovingAverageMinMaxObserver(ObserverQuantizer):
    """Exponential moving average of per-batch minima and maxima. Options: :class:`EMAOptions`."""

    Options = EMAOptions

    def combine(self, low: torch.Tensor, high: torch.Tensor) -> None:
        self.min_val.lerp_(low, self.options.momentum)
        self.max_val.lerp_(high, self.options.momentum)


@QUANTIZERS.register("percentile")
class PercentileObserver(ObserverQuantizer):
    """Mean over observed batches of the per-batch ``percentile`` / ``100 - percentile`` values.

    Uses the nearest-rank definition: the k-th smallest value with ``k = ceil(p / 100 * n)``. Clipping the
    few outliers that min-max would chase usually helps low-bit activations. Options:
    :class:`PercentileOptions`.
    """

    Options = PercentileOptions

    @staticmethod
    def _rank(fraction: float, n: int) -> int:
        return min(max(math.ceil(fraction * n), 1), n)

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grouped = self._grouped(x.detach()).to(self.min_val.dtype)
        n = grouped.shape[1]
        high = grouped.kthvalue(self._rank(self.options.percentile / 100.0, n), dim=1).values
        low = grouped.kthvalue(self._rank(1.0 - self.options.percentile / 100.0, n), dim=1).values
        return all_reduce_mean(low), all_reduce_mean(high)

    def combine(self, low: torch.Tensor, high: torch.Tensor) -> None:
        seen = int(self.init_batches_seen)
        self.min_val.add_((low - self.min_val) / (seen + 1))
        self.max_val.add_((high - self.max_val) / (seen + 1))


@QUANTIZERS.register("mse")
class MSEObserver(PercentileObserver):
    """Mean over observed batches of each batch's MSE-optimal step (stored as the range it implies).

    Each batch's step minimises the mean squared quantization error of that batch on the grid
    (:func:`~model_quantization.quantizers.estimators.mse_step`, the estimator LSQ's ``init_method: mse``
    uses too); the range stored is ``[-step * Qp, step * Qp]`` (signed) or ``[0, step * Qp]``, so the
    quantizer's step is exactly that estimate, averaged over batches like :class:`PercentileObserver`.
    The usual post-training choice at 4 bits and below, where the best clip is well inside the range.
    """

    Options = QuantizerOptions

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        axis = self._per_channel_axis(x)
        if self.sign_grid:  # {-s, +s}: mean|x| is the least-squares scale
            dims = [d for d in range(x.dim()) if d != axis]
            step = x.detach().abs().mean(dim=dims) if dims else x.detach().abs()
        else:
            step = mse_step(x, self.qn, self.qp, axis)
        high = all_reduce_mean(step.to(self.max_val.dtype).reshape(self.max_val.shape) * self.qp)
        return (-high if self.signed else torch.zeros_like(high)), high
