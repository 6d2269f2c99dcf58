"""Range estimators: the step that maps a tensor onto an integer grid ``[-Qn, Qp]`` with least error.

Shared by LSQ's calibrated initialisation (``init_method: mse`` / ``percentile``) and the PTQ observers:
one implementation of each estimator.

* :func:`mse_step` searches the step that minimises the mean squared quantization error
  ``mean((clamp(round(x / s), -Qn, Qp) * s - x)^2)``, the usual PTQ/QAT-init criterion: at 2-3 bits the
  best clip is far inside ``max|x|`` (clipping a few outliers buys resolution for everything else).
* :func:`percentile_step` clips at a percentile of ``|x|``.

Both work per tensor or per channel (one step per slice along ``axis``) and return float32 steps shaped
like the quantizer's state (``()`` or ``(C,)``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["MAX_SAMPLES", "mse_step", "percentile_step"]

#: Estimates look at most this many elements per group (an evenly strided subset above it). Large, because
#: a small strided sample can miss every outlier of a heavy-tailed activation (2^15 elements put the MSE
#: clip 2 % above the full tensor's optimum); :func:`mse_step` of 2^22 elements takes ~0.15 s on 1 core.
MAX_SAMPLES = 1 << 22
#: Candidate clips, as fractions of max|x|, tried by :func:`mse_step` (a coarse grid, then a fine one over
#: two coarse intervals). The error of a few hundred elements at 8 bits is jagged in the clip: 20 fine
#: points left 2 of 300 random 64x9 tensors > 1 % above the brute-force optimum; 80 points: 0.1 % at worst.
_COARSE, _FINE = 40, 80
#: :func:`mse_step` summarises a group larger than this into a histogram of as many bins (each bin's
#: element count and mean): every candidate clip is then scored in O(bins), not O(elements). At 8 bits the
#: grid has 16 bins per step, so a bin straddling a rounding boundary moves the score by a hair.
_BINS = 4096


def _groups(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``x`` as float32 (groups, elements): one group per tensor, or one per slice along ``axis``."""
    x = x.detach().to(torch.float32)
    grouped = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)
    if grouped.shape[1] > MAX_SAMPLES:
        stride = math.ceil(grouped.shape[1] / MAX_SAMPLES)
        grouped = grouped[:, ::stride]
    return grouped


def _shape(values: torch.Tensor, axis: int | None) -> torch.Tensor:
    return values.reshape(()) if axis is None else values


def _histogram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group of ``x`` (G, N) as ``_BINS`` equal bins over ``[min, max]``: (means, counts), each (G, B).

    The squared error of quantizing a bin's elements to one level ``q`` is ``n (q - mean)^2`` plus the
    bin's own spread, which no clip changes -- so scoring the means, weighted by the counts, ranks the
    candidates as the elements would (up to bins that straddle a rounding boundary). Empty bins have
    count 0 and mean 0.
    """
    groups = x.shape[0]
    low = x.amin(dim=1, keepdim=True)
    width = (x.amax(dim=1, keepdim=True) - low).clamp_min(torch.finfo(torch.float32).tiny) / _BINS
    index = ((x - low) / width).floor_().clamp_(0, _BINS - 1).long()
    index += torch.arange(groups, device=x.device).unsqueeze(1) * _BINS
    index = index.reshape(-1)
    values = x.reshape(-1).to(torch.float64)  # sums of up to 2^22 elements: float32 would lose digits
    counts = torch.bincount(index, minlength=groups * _BINS).to(torch.float64)
    means = torch.bincount(index, weights=values, minlength=groups * _BINS) / counts.clamp_min(1)
    return means.to(torch.float32).reshape(groups, _BINS), counts.to(torch.float32).reshape(groups, _BINS)


def _errors(
    x: torch.Tensor, weights: torch.Tensor | None, steps: torch.Tensor, qn: int, qp: int
) -> torch.Tensor:
    """Squared error of quantizing every group of ``x`` (G, N) with each of ``steps`` (G, K): (G, K), as
    a mean over the elements, or as a sum weighted by ``weights`` (G, N; histogram counts) when given.

    One candidate at a time through a single reused buffer (in-place ops): fresh allocations per
    candidate would cost more than the arithmetic.
    """
    errors = torch.empty_like(steps)
    buffer = torch.empty_like(x)
    for k in range(steps.shape[1]):
        s = steps[:, k : k + 1]
        torch.div(x, s, out=buffer)
        buffer.round_().clamp_(-qn, qp).mul_(s).sub_(x).square_()
        errors[:, k] = buffer.mean(dim=1) if weights is None else buffer.mul_(weights).sum(dim=1)
    return errors


def mse_step(x: torch.Tensor, qn: int, qp: int, axis: int | None = None) -> torch.Tensor:
    """The step minimising the mean squared quantization error of ``x`` on the grid ``[-qn, qp]``.

    A grid search over clips ``c`` in ``(0, max|x|]`` (step ``c / qp``; for signed grids the clip is the
    positive end), first coarse, then fine around the best coarse candidate. Every element counts: groups
    larger than ``_BINS`` are scored through their histogram (:func:`_histogram`), smaller ones directly.

    Args:
        x: the tensor to quantize.
        qn, qp: the integer grid (``qn = 0`` for unsigned grids).
        axis: one step per slice along this axis (per-channel weights); None for one step.
    """
    grouped = _groups(x, axis)
    peak = grouped.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    points, weights = _histogram(grouped) if grouped.shape[1] > _BINS else (grouped, None)
    fractions = torch.arange(1, _COARSE + 1, dtype=torch.float32, device=grouped.device) / _COARSE
    steps = peak * fractions / qp
    best = _errors(points, weights, steps, qn, qp).argmin(dim=1, keepdim=True)
    # Refine in the interval between the coarse neighbours of the best candidate.
    low = (best.to(torch.float32) / _COARSE).clamp_min(0.5 / _COARSE)
    high = (best.to(torch.float32) + 2) / _COARSE
    fine = low + (high - low) * torch.arange(_FINE + 1, dtype=torch.float32, device=grouped.device) / _FINE
    steps = peak * fine.clamp_max(1.0) / qp
    chosen = steps.gather(1, _errors(points, weights, steps, qn, qp).argmin(dim=1, keepdim=True))
    return _shape(chosen.squeeze(1), axis)


def percentile_step(x: torch.Tensor, qp: int, percentile: float, axis: int | None = None) -> torch.Tensor:
    """Step that puts the ``percentile``-th percentile of ``|x|`` at the top of the grid (``c / qp``)."""
    grouped = _groups(x, axis).abs()
    k = min(max(math.ceil(percentile / 100.0 * grouped.shape[1]), 1), grouped.shape[1])
    clip = grouped.kthvalue(k, dim=1).values
    return _shape(clip / qp, axis)
