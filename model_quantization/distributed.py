"""Rank-consistent reductions for data-driven quantizer state.

Data-driven initialisation (an LSQ step from the first batch, an observer's range, an LQ-Net basis update)
sees only the local shard of the batch. If every DDP rank kept its own estimate, the replicas would start
from different step sizes and silently diverge: DDP synchronises gradients, not values set under
``torch.no_grad()``. These helpers make every rank agree. Without an initialised process group (single
process training, unit tests) they are no-ops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_max", "all_reduce_mean", "all_reduce_min", "is_distributed", "world_size"]


def is_distributed() -> bool:
    """True when a default process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if not is_distributed():
        return tensor
    # Reduce a detached contiguous copy so callers can pass views or tensors that require grad.
    buffer = tensor.detach().clone().contiguous()
    dist.all_reduce(buffer, op=op)
    with torch.no_grad():
        tensor.copy_(buffer)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Replace ``tensor`` in place by its average over all ranks and return it.

    Every rank must call this collectively, in the same order, with a tensor of the same shape. No-op
    without an initialised process group (or with a single rank).
    """
    if not is_distributed():
        return tensor
    _all_reduce(tensor, dist.ReduceOp.SUM)
    with torch.no_grad():
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Replace ``tensor`` in place by its element-wise minimum over all ranks (observers' ranges)."""
    return _all_reduce(tensor, dist.ReduceOp.MIN)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Replace ``tensor`` in place by its element-wise maximum over all ranks (observers' ranges)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)
