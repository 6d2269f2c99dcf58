"""Per-level normalisation: one norm per FPN level behind one shared module (AQD's "multi-level BN").

Detection heads (RetinaNet, FCOS) apply the same convolutions to every FPN level. With quantized
activations the levels' statistics differ enough that a single BatchNorm hurts, so each level gets its own
norm while the conv weights stay shared. The container looks like one norm to the surrounding code
(``conv.norm = PerLevelNorm(...)`` keeps detectron2's ``conv -> norm -> activation`` forward unchanged);
the head selects the level around each call with :func:`select_level`::

    for level, feature in enumerate(features):
        with select_level(head, level):
            outputs.append(head.cls_subnet(feature))
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["PerLevelNorm", "select_level"]


class PerLevelNorm(nn.Module):
    """Holds one norm per level and applies the one of the selected level.

    Args:
        norms: one module per level (e.g. ``BatchNorm2d``), applied as ``norms[level](x)``.

    The level is either passed to :meth:`forward` or set beforehand (``module.level = i``, usually through
    :func:`select_level`); using the module with no level selected is an error, never a silent default.
    A state dict of a single shared norm (``weight``, ``bias``, ``running_mean``, ...) loads into every
    level, so float checkpoints with a shared head norm load unchanged.
    """

    def __init__(self, norms: Iterable[nn.Module]) -> None:
        super().__init__()
        self.norms = nn.ModuleList(norms)
        if len(self.norms) == 0:
            raise ValueError("PerLevelNorm needs at least one norm")
        #: The level used when forward() gets none; not state.
        self.level: int | None = None
        self.register_load_state_dict_pre_hook(PerLevelNorm._expand_shared_state)

    @classmethod
    def from_norm(cls, norm: nn.Module, num_levels: int) -> PerLevelNorm:
        """``num_levels`` independent copies of ``norm`` (parameters and running statistics included)."""
        return cls(copy.deepcopy(norm) for _ in range(num_levels))

    @property
    def num_levels(self) -> int:
        return len(self.norms)

    def forward(self, x: torch.Tensor, level: int | None = None) -> torch.Tensor:
        level = self.level if level is None else level
        if level is None:
            raise RuntimeError(
                "PerLevelNorm: no level selected; pass level= or wrap the call in select_level(module, level)"
            )
        if not 0 <= level < len(self.norms):
            raise IndexError(f"PerLevelNorm: level {level} out of range for {len(self.norms)} levels")
        return self.norms[level](x)

    @staticmethod
    def _expand_shared_state(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Keys of one shared norm look like "<prefix>weight"; per-level keys "<prefix>norms.<i>.weight".
        shared = [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix) :]]
        if not shared or any(k.startswith(prefix + "norms.") for k in state_dict):
            return
        for key in shared:
            value = state_dict.pop(key)
            for i in range(len(module.norms)):
                state_dict[f"{prefix}norms.{i}.{key[len(prefix) :]}"] = value

    def extra_repr(self) -> str:
        return f"levels={len(self.norms)}"


@contextlib.contextmanager
def select_level(module: nn.Module, level: int) -> Iterator[None]:
    """Select ``level`` for every :class:`PerLevelNorm` inside ``module`` (itself included) in the block."""
    norms = [m for m in module.modules() if isinstance(m, PerLevelNorm)]
    previous = [m.level for m in norms]
    for m in norms:
        m.level = level
    try:
        yield
    finally:
        for m, old in zip(norms, previous, strict=True):
            m.level = old
