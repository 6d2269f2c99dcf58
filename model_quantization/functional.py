"""Fake-quantization functions with analytic gradients.

Each hot-path function is one ``torch.autograd.Function`` whose backward is written out from the paper's
formula instead of being derived by autograd from a chain of element-wise ops. That saves the
intermediate tensors autograd would keep alive and, on CPU, lets one fused kernel
(:mod:`model_quantization.kernels.cpu`) produce the input gradient and the step-size reduction in a
single pass over memory. The ``*_reference`` functions are the naive autograd compositions of the same
formulas; tests check that both paths agree and the benchmark shows what fusing buys.

Kernels exist for LSQ/LSQ+, PACT/DoReFa activations, binary activations (sign forward; Bi-Real and
clipped straight-through backward) and LQ-Net's nearest-level search with the per-level statistics of its
basis fit (:func:`nearest_level`).

Backends: ``"auto"`` (default) uses the compiled CPU kernel for contiguous float32 CPU tensors when it can
be built and the eager analytic implementation otherwise; ``"eager"`` always uses the latter. Both give
bit-identical outputs and input gradients. Under ``torch.compile`` the eager implementation is what gets
traced (and fused by the compiler).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

from model_quantization.kernels import cpu as cpu_kernels

__all__ = [
    "MIN_STEP",
    "NearestLevels",
    "backend",
    "bireal_sign",
    "clip_fake_quant",
    "dorefa_weight",
    "get_backend",
    "lsq_fake_quant",
    "lsq_fake_quant_reference",
    "nearest_level",
    "pact_fake_quant",
    "pact_fake_quant_reference",
    "round_ste",
    "scale_grad",
    "set_backend",
    "sign_ste",
    "straight_through",
    "xnor_weight",
]

_BACKENDS = ("auto", "eager")
_backend = "auto"

#: Smallest step any quantizer uses: a dead (all-zero) input or an overshooting SGD update must never give a
#: zero or negative step (a division by zero, or a grid with flipped signs).
MIN_STEP = torch.finfo(torch.float32).tiny * 1e3
_HALF_TYPES = (torch.float16,)


def _positive(step: torch.Tensor) -> torch.Tensor:
    """``step`` clamped to at least :data:`MIN_STEP` (float16's smallest normal number in float16).

    Called inside the autograd functions' forward, so it adds no autograd node: values above the minimum
    are unchanged bit for bit, and the backward returns the gradient at the clamped value to the raw
    parameter (straight through), so a step that SGD pushed below zero can still grow back.
    """
    floor = torch.finfo(step.dtype).tiny if step.dtype in _HALF_TYPES else MIN_STEP
    return step.clamp_min(floor)


def set_backend(name: str) -> None:
    """Select ``"auto"`` (compiled CPU kernel when possible) or ``"eager"`` for all fake-quant calls."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown fake-quant backend {name!r}; valid: {', '.join(_BACKENDS)}")
    _backend = name


def get_backend() -> str:
    """The backend selected by :func:`set_backend` (``"auto"`` unless changed)."""
    return _backend


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`, restoring the previous backend on exit."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _kernel_library(*tensors: torch.Tensor | None) -> ctypes.CDLL | None:
    """The compiled kernels if the backend allows them and every given tensor is CPU float32 contiguous.

    Never under ``torch.compile``/``torch.export``: dynamo cannot trace into a ctypes call, while the eager
    ops are what a compiled graph should contain anyway. (Tested first, so that a compiled graph does not
    read, and hence guard on, the selected backend: switching it causes no recompilation.)
    """
    if torch.compiler.is_compiling() or _backend != "auto":
        return None
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()):
            return None
    return cpu_kernels.load()


def _channel_view(shape: torch.Size, channel_axis: int | None) -> tuple[int, int, int]:
    """(outer, channels, inner) sizes of a contiguous tensor viewed around ``channel_axis``."""
    if channel_axis is None:
        return 1, 1, math.prod(shape)
    return math.prod(shape[:channel_axis]), shape[channel_axis], math.prod(shape[channel_axis + 1 :])


def _broadcastable(param: torch.Tensor, ndim: int, channel_axis: int | None) -> torch.Tensor:
    """Reshape a per-tensor (numel 1) or per-channel (numel C) parameter to broadcast against the input."""
    if channel_axis is None:
        return param.reshape(())
    shape = [1] * ndim
    shape[channel_axis] = -1
    return param.reshape(shape)


def _reduce_to(grad: torch.Tensor, like: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    """Sum an element-wise gradient down to the shape of a per-tensor/per-channel parameter."""
    if channel_axis is None:
        return grad.sum().reshape(like.shape)
    dims = [d for d in range(grad.dim()) if d != channel_axis]
    return grad.sum(dim=dims).reshape(like.shape)


# --------------------------------------------------------------------------------------------------------
# Straight-through building blocks
# --------------------------------------------------------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """Forward returns ``quantized`` exactly; backward hands the gradient to ``x`` unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized.clone() if quantized is x else quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Return ``quantized`` with the gradient of the identity w.r.t. ``x`` (straight-through estimator).

    Unlike the ``x + (q - x).detach()`` idiom, the forward value is exactly ``quantized``.
    """
    return _StraightThrough.apply(x, quantized.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (half to even) with an identity gradient."""
    return straight_through(x, torch.round(x))


def _sign(x: torch.Tensor) -> torch.Tensor:
    """Sign with sign(0) = +1, so a binary quantizer really has exactly two levels."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` (LSQ's gradient scale g)."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


def _sign_fast(x: torch.Tensor) -> torch.Tensor:
    """:func:`_sign`, by the fused kernel when it applies (one pass instead of a mask and a select)."""
    lib = _kernel_library(x)
    if lib is None:
        return _sign(x)
    out = torch.empty_like(x)
    lib.mq_sign_forward(x.data_ptr(), out.data_ptr(), x.numel(), torch.get_num_threads())
    return out


class _SignSTE(torch.autograd.Function):
    """sign(x) forward; straight-through gradient clipped to |x| <= clip (Courbariaux et al., 2016)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clip = clip
        return _sign_fast(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        if ctx.clip is None:
            return grad, None
        grad = grad.contiguous()
        lib = _kernel_library(x, grad)
        if lib is not None:
            dx = torch.empty_like(x)
            lib.mq_ste_backward(
                x.data_ptr(), grad.data_ptr(), dx.data_ptr(), x.numel(), ctx.clip, torch.get_num_threads()
            )
            return dx, None
        return torch.where(x.abs() <= ctx.clip, grad, 0.0), None


def sign_ste(x: torch.Tensor, clip: float | None = 1.0) -> torch.Tensor:
    """Binarise to {-1, +1} with the straight-through gradient ``1[|x| <= clip]`` (``clip=None``: identity)."""
    return _SignSTE.apply(x, clip)


class _BiRealSign(torch.autograd.Function):
    """Bi-Real Net's ApproxSign (Liu et al., 2018, eq. 4): d/dx = 2 - 2|x| for |x| < 1, else 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _sign_fast(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        grad = grad.contiguous()
        lib = _kernel_library(x, grad)
        if lib is not None:
            dx = torch.empty_like(x)
            lib.mq_bireal_backward(
                x.data_ptr(), grad.data_ptr(), dx.data_ptr(), x.numel(), torch.get_num_threads()
            )
            return dx
        return grad * (2.0 - 2.0 * x.abs()).clamp_min(0.0)


def bireal_sign(x: torch.Tensor) -> torch.Tensor:
    """Binarise activations to {-1, +1} with Bi-Real Net's piecewise-polynomial gradient."""
    return _BiRealSign.apply(x)


# --------------------------------------------------------------------------------------------------------
# LSQ / LSQ+
# --------------------------------------------------------------------------------------------------------


def _lsq_levels(x, step, offset, qn, qp, sign_grid):
    """Eager LSQ core shared by forward and backward: ``v = (x - b) / s``, its clamp, and its level ``q``."""
    v = (x - offset) / step if offset is not None else x / step
    clamped = v.clamp(-qn, qp)
    q = _sign(v) if sign_grid else clamped.round()
    return v, clamped, q


class _LSQFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, offset, qn, qp, sign_grid, grad_scale, channel_axis):
        ctx.qn, ctx.qp, ctx.sign_grid, ctx.grad_scale, ctx.channel_axis = (
            qn,
            qp,
            sign_grid,
            grad_scale,
            channel_axis,
        )
        step = _positive(step)
        ctx.save_for_backward(x, step, offset)
        lib = _kernel_library(x, step, offset)
        if lib is not None:
            out = torch.empty_like(x)
            beta = offset if offset is not None else torch.zeros_like(step)
            lib.mq_lsq_forward(
                x.data_ptr(), out.data_ptr(), *_channel_view(x.shape, channel_axis), step.data_ptr(),
                beta.data_ptr(), qn, qp, int(sign_grid), torch.get_num_threads(),
            )  # fmt: skip
            return out
        s = _broadcastable(step, x.dim(), channel_axis)
        b = None if offset is None else _broadcastable(offset, x.dim(), channel_axis)
        _, _, q = _lsq_levels(x, s, b, qn, qp, sign_grid)
        return q * s + b if b is not None else q * s

    @staticmethod
    def backward(ctx, grad):
        x, step, offset = ctx.saved_tensors
        qn, qp, axis = ctx.qn, ctx.qp, ctx.channel_axis
        need_x, need_step, need_offset = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        lib = _kernel_library(x, step, offset, grad)
        if lib is not None:
            dx = torch.empty_like(x)
            channels = _channel_view(x.shape, axis)[1]
            dstep = torch.empty(channels, dtype=torch.float64)
            doffset = torch.empty(channels, dtype=torch.float64)
            beta = offset if offset is not None else torch.zeros_like(step)
            lib.mq_lsq_backward(
                x.data_ptr(), grad.data_ptr(), dx.data_ptr(), *_channel_view(x.shape, axis), step.data_ptr(),
                beta.data_ptr(), qn, qp, int(ctx.sign_grid), dstep.data_ptr(), doffset.data_ptr(),
                torch.get_num_threads(),
            )  # fmt: skip
            dstep = (dstep * ctx.grad_scale).to(step.dtype).reshape(step.shape) if need_step else None
            if offset is not None and need_offset:
                doffset = (doffset * ctx.grad_scale).to(offset.dtype).reshape(offset.shape)
            else:
                doffset = None
            return dx if need_x else None, dstep, doffset, None, None, None, None, None
        s = _broadcastable(step, x.dim(), axis)
        b = None if offset is None else _broadcastable(offset, x.dim(), axis)
        v, clamped, q = _lsq_levels(x, s, b, qn, qp, ctx.sign_grid)
        inside = clamped == v  # same as -qn <= v <= qp, in one pass
        dx = torch.where(inside, grad, 0.0) if need_x else None
        dstep = None
        if need_step:
            dstep = _reduce_to(grad * torch.where(inside, q - v, q), step, axis) * ctx.grad_scale
        doffset = None
        if offset is not None and need_offset:
            doffset = _reduce_to(torch.where(inside, 0.0, grad), offset, axis) * ctx.grad_scale
        return dx, dstep, doffset, None, None, None, None, None


def lsq_fake_quant(
    x: torch.Tensor,
    step: torch.Tensor,
    qn: int,
    qp: int,
    *,
    sign_grid: bool = False,
    grad_scale: float = 1.0,
    offset: torch.Tensor | None = None,
    channel_axis: int | None = None,
) -> torch.Tensor:
    """LSQ fake quantization (Esser et al., ICLR 2020), optionally with the LSQ+ offset.

    Forward: ``v = (x - offset) / step``, ``q = round(clamp(v, -qn, qp))``, ``out = q * step + offset``.
    With ``sign_grid`` (signed 1-bit) ``q = sign(v)`` in {-1, +1} (qn = qp = 1).

    Backward (analytic): ``dx = g * 1[-qn <= v <= qp]``; ``dstep = grad_scale * sum(g * (q - v))`` inside
    the range and ``grad_scale * sum(g * q)`` outside (i.e. -qn / qp); ``doffset = grad_scale *
    sum(g * 1[outside])``. Sums run over every element (per-tensor) or over all but ``channel_axis``.

    Args:
        x: input tensor.
        step: step size, numel 1 (per-tensor) or ``x.shape[channel_axis]`` (per-channel).
        qn, qp: number of negative / positive levels (the grid is the integers in ``[-qn, qp]``).
        sign_grid: use the symmetric binary grid {-1, +1} instead of integers.
        grad_scale: LSQ's g, applied to the step (and offset) gradient only.
        offset: LSQ+ learnable offset, same shape as ``step``, or ``None``.
        channel_axis: axis of ``x`` that ``step`` indexes, ``None`` for per-tensor.
    """
    if channel_axis is not None and channel_axis < 0:
        channel_axis += x.dim()
    return _LSQFakeQuant.apply(
        x, step, offset, float(qn), float(qp), sign_grid, float(grad_scale), channel_axis
    )


def lsq_fake_quant_reference(
    x: torch.Tensor,
    step: torch.Tensor,
    qn: int,
    qp: int,
    *,
    sign_grid: bool = False,
    grad_scale: float = 1.0,
    offset: torch.Tensor | None = None,
    channel_axis: int | None = None,
) -> torch.Tensor:
    """Naive autograd composition of :func:`lsq_fake_quant` (same values; gradients derived by autograd)."""
    if channel_axis is not None and channel_axis < 0:
        channel_axis += x.dim()
    s = _broadcastable(scale_grad(step, grad_scale), x.dim(), channel_axis)
    b = None if offset is None else _broadcastable(scale_grad(offset, grad_scale), x.dim(), channel_axis)
    v = x / s if b is None else (x - b) / s
    v = v.clamp(-qn, qp)  # clamp's gradient is 1 on the closed range, like the analytic mask
    q = sign_ste(v, clip=None) if sign_grid else round_ste(v)
    return q * s if b is None else q * s + b


# --------------------------------------------------------------------------------------------------------
# PACT and fixed-clip uniform activations (DoReFa)
# --------------------------------------------------------------------------------------------------------


class _ClipFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, levels):
        alpha = _positive(alpha)
        ctx.save_for_backward(x, alpha)
        step = alpha / levels
        lib = _kernel_library(x, alpha)
        if lib is not None and alpha.numel() == 1:
            out = torch.empty_like(x)
            lib.mq_clip_forward(
                x.data_ptr(), out.data_ptr(), x.numel(), float(alpha), float(step), torch.get_num_threads()
            )
            return out
        y = torch.minimum(x.clamp_min(0.0), alpha)
        return torch.round(y / step) * step

    @staticmethod
    def backward(ctx, grad):
        x, alpha = ctx.saved_tensors
        need_x, need_alpha = ctx.needs_input_grad[:2]
        grad = grad.contiguous()
        lib = _kernel_library(x, alpha, grad)
        if lib is not None and alpha.numel() == 1:
            dx = torch.empty_like(x)
            dalpha = lib.mq_clip_backward(
                x.data_ptr(), grad.data_ptr(), dx.data_ptr(), x.numel(), float(alpha), torch.get_num_threads()
            )
            dalpha = torch.tensor(dalpha, dtype=alpha.dtype).reshape(alpha.shape) if need_alpha else None
            return dx if need_x else None, dalpha, None
        above = x >= alpha
        dx = torch.where((x >= 0) & ~above, grad, 0.0) if need_x else None
        dalpha = torch.where(above, grad, 0.0).sum().reshape(alpha.shape) if need_alpha else None
        return dx, dalpha, None


def pact_fake_quant(x: torch.Tensor, alpha: torch.Tensor, levels: int) -> torch.Tensor:
    """PACT (Choi et al., 2018): ``y = clamp(x, 0, alpha)``, ``out = round(y * levels / alpha) * alpha / levels``.

    Backward (the paper's straight-through form): ``dx = g * 1[0 <= x < alpha]`` and
    ``dalpha = sum(g * 1[x >= alpha])``.

    Args:
        x: input activations.
        alpha: clipping level, a one-element tensor (learnable for PACT, constant for DoReFa).
        levels: number of steps, ``2**bits - 1``.
    """
    return _ClipFakeQuant.apply(x, alpha, float(levels))


def pact_fake_quant_reference(x: torch.Tensor, alpha: torch.Tensor, levels: int) -> torch.Tensor:
    """Naive autograd composition of :func:`pact_fake_quant` (same values and gradients)."""
    y = torch.minimum(x.clamp_min(0.0), alpha)  # d/dalpha = 1 where x >= alpha (ties go to alpha)
    step = alpha.detach() / float(levels)
    return straight_through(y, torch.round(y / step) * step)


def clip_fake_quant(x: torch.Tensor, clip: float, levels: int) -> torch.Tensor:
    """DoReFa activations: quantize ``clamp(x, 0, clip)`` to ``levels + 1`` uniform levels (no learnable clip)."""
    alpha = torch.tensor(float(clip), dtype=x.dtype, device=x.device)
    return _ClipFakeQuant.apply(x, alpha, float(levels))


# --------------------------------------------------------------------------------------------------------
# Weight transforms (small tensors: autograd compositions are fast enough)
# --------------------------------------------------------------------------------------------------------


def _reduce_abs_mean(w: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    if channel_axis is None:
        return w.abs().mean()
    dims = [d for d in range(w.dim()) if d != channel_axis]
    return w.abs().mean(dim=dims, keepdim=True)


def dorefa_weight(w: torch.Tensor, bits: int, channel_axis: int | None = None) -> torch.Tensor:
    """DoReFa-Net weights (Zhou et al., 2016), values in [-1, 1] with ``2**bits`` levels.

    ``bits == 1``: ``sign(w) * E|w|`` (mean over the tensor or each output channel), identity gradient.
    ``bits > 1``: ``t = tanh(w) / (2 max|tanh(w)|) + 1/2``, ``out = 2 round((2^k - 1) t) / (2^k - 1) - 1``;
    gradients flow through tanh and the max normalisation, round is straight-through.
    """
    if bits == 1:
        return sign_ste(w, clip=None) * _reduce_abs_mean(w, channel_axis).detach()
    t = torch.tanh(w)
    if channel_axis is None:
        peak = t.abs().max()
    else:
        dims = [d for d in range(w.dim()) if d != channel_axis]
        peak = t.abs().amax(dim=dims, keepdim=True)
    levels = float(2**bits - 1)
    unit = t / (2.0 * peak) + 0.5
    return 2.0 * (round_ste(unit * levels) / levels) - 1.0


def xnor_weight(w: torch.Tensor, channel_axis: int | None = 0) -> torch.Tensor:
    """XNOR-Net weights (Rastegari et al., 2016): ``sign(w) * mean|w|`` per output channel (or per tensor).

    The scale is differentiated (it is a function of w); sign uses the straight-through gradient clipped to
    |w| <= 1, which yields the paper's ``dL/dw_i = g_i * alpha * 1[|w_i| <= 1] + sign(w_i) / n * sum_j g_j
    sign(w_j)``.
    """
    return sign_ste(w, clip=1.0) * _reduce_abs_mean(w, channel_axis)


# --------------------------------------------------------------------------------------------------------
# Nearest of a set of levels (LQ-Net)
# --------------------------------------------------------------------------------------------------------


class NearestLevels(NamedTuple):
    """What :func:`nearest_level` returns.

    Attributes:
        values: the nearest level of every element, shape of ``x``.
        index: the position of that level in the sorted levels (int64), or None when the fused kernel ran
            (it does not materialise it).
        counts, sums: float64 ``(groups, L)``, how many elements went to each sorted level and their sum;
            None unless ``statistics`` was asked for.
    """

    values: torch.Tensor
    index: torch.Tensor | None
    counts: torch.Tensor | None
    sums: torch.Tensor | None


def nearest_level(x: torch.Tensor, levels: torch.Tensor, *, statistics: bool = False) -> NearestLevels:
    """Map every element of row ``g`` of ``x`` (``groups x m``) to the nearest of ``levels[g]`` (ascending).

    A value half-way between two levels goes to the lower one and NaN to the top level:
    ``index = searchsorted(mid-points, x)`` (side left), ``values = levels[index]`` (exact copies of the levels).
    With ``statistics`` also the per-level counts and sums that LQ-Net's least-squares basis fit needs.

    The fused CPU kernel (contiguous float32) gives the same values and counts as the eager path; its sums
    are accumulated in float within blocks of 2048 elements and in double across blocks (the eager path sums
    in double), so they agree to float32 precision.
    """
    thresholds = ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()
    groups, num_levels = levels.shape
    lib = _kernel_library(x, levels, thresholds)
    if lib is not None and x.dim() == 2 and x.shape[0] == groups and num_levels <= 256:
        values = torch.empty_like(x)
        counts = sums = None
        if statistics:
            counts = torch.empty(groups, num_levels, dtype=torch.float64)
            sums = torch.empty_like(counts)
        status = lib.mq_nearest_level(
            x.data_ptr(), values.data_ptr(), groups, groups, x.shape[1], levels.data_ptr(), thresholds.data_ptr(),
            num_levels, None if counts is None else counts.data_ptr(), None if sums is None else sums.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if status == 0:
            return NearestLevels(values, None, counts, sums)
    index = torch.searchsorted(thresholds, x.contiguous())
    values = levels.gather(1, index)
    counts = sums = None
    if statistics:
        counts = torch.zeros(groups, num_levels, dtype=torch.float64, device=x.device)
        sums = torch.zeros_like(counts)
        counts.scatter_add_(1, index, torch.ones_like(x, dtype=torch.float64))
        sums.scatter_add_(1, index, x.to(torch.float64))
    return NearestLevels(values, index, counts, sums)
