"""Inference-time norms as per-channel affines, so they fold into the convolution before them.

A norm in eval mode is ``y = g * x + h`` per channel. Folded into a quantized conv it changes the conv's
per-output-channel weight *scale* (``s_w * |g|``) and its bias (``g * b + h``), never the integer weight
codes, except that a negative ``g`` flips a channel's codes (``-code`` is on the same symmetric grid).

:data:`NORM_AFFINES` maps a norm type to a function returning one ``(g, h)`` per *level*: one for an
ordinary BatchNorm, one per FPN level for the per-level norms of shared detection heads (detectron2's
``CycleBatchNormList``, AdelaiDet's ``ModuleListDial``), which cycle through their levels call by call.
Integrations register their norm types (:mod:`model_quantization.deploy.detectors` registers
detectron2's and AdelaiDet's); a norm type that is not registered is not folded and runs as itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from model_quantization.registry import Registry

__all__ = ["NORM_AFFINES", "Affine", "batch_norm_affine", "norm_affines"]

#: One level's ``(g, h)``: the norm computes ``g * x + h`` per channel (float32 vectors).
Affine = tuple[torch.Tensor, torch.Tensor]

#: norm type -> function(norm) -> list of per-level affines (looked up along the MRO).
NORM_AFFINES: Registry[Callable[[nn.Module], list[Affine]]] = Registry("foldable norm")


@torch.no_grad()
def batch_norm_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> Affine:
    """``(g, h)`` of ``weight * (x - mean) / sqrt(var + eps) + bias`` (BatchNorm in eval mode)."""
    inv_std = torch.rsqrt(running_var.to(torch.float32) + eps)
    g = inv_std if weight is None else weight.to(torch.float32) * inv_std
    h = -running_mean.to(torch.float32) * g
    if bias is not None:
        h = h + bias.to(torch.float32)
    return g.detach().clone(), h.detach().clone()


def _batch_norm(norm: nn.modules.batchnorm._BatchNorm) -> list[Affine]:
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError("it keeps no running statistics (track_running_stats=False)")
    weight, bias = (norm.weight, norm.bias) if norm.affine else (None, None)
    return [batch_norm_affine(norm.running_mean, norm.running_var, norm.eps, weight, bias)]


NORM_AFFINES.add(nn.BatchNorm2d, _batch_norm)
NORM_AFFINES.add(nn.SyncBatchNorm, _batch_norm)


def norm_affines(norm: nn.Module) -> list[Affine] | None:
    """The per-level affines of ``norm``, or None when its type is not registered (it is not folded)."""
    if norm.training:
        raise ValueError(f"{type(norm).__name__} is in training mode: export the model in eval mode")
    affines = NORM_AFFINES.for_type(type(norm))
    return None if affines is None else affines(norm)
