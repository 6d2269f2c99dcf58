"""Checkpoint guards the build hook attaches to a quantized model, so an unchanged ``train_net.py`` /
``DetectionCheckpointer`` never runs quantizers silently on state that belongs to another grid.

A load_state_dict pre-hook on the model (like the double init of :mod:`.checkpoint`) sees every checkpoint
loaded into it (``MODEL.WEIGHTS``, ``--resume``, ``--eval-only``):

* the grid check (:func:`attach_grid_check`): every enabled quantizer records its grid in checkpoints
  (:data:`~model_quantization.quantizers.base.RECIPE_KEY`); a checkpoint whose grids differ from the
  model's (bits, signedness, granularity, method, or quantized vs float) fails before anything is loaded,
  naming the modules and the way out. Checkpoints without records (float ones, or written before grids
  were recorded) load as before.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from torch import nn

from ..quantizers import Quantizer, grid_mismatches
from ..quantizers.base import RECIPE_KEY

__all__ = ["attach_grid_check", "grid_mismatch_message"]

logger = logging.getLogger(__name__)

REINIT_HINT = (
    "to start a lower-bit run from this checkpoint, set MODEL.QUANTIZATION.REINIT_QUANTIZERS: True (its weights "
    "load and its quantizers initialise from data again)"
)


def quantizer_entries(model: nn.Module, state_dict, prefix: str = "") -> list[str]:
    """The keys of ``state_dict`` (under ``prefix``) that are quantizer state: the state of the model's
    quantizers, and of any ``*_quantizer`` module the checkpoint has and the model has not."""
    names = {name for name, m in model.named_modules() if isinstance(m, Quantizer)}
    keys = []
    for key in state_dict:
        if not key.startswith(prefix):
            continue
        owner = key[len(prefix) :].rpartition(".")[0]
        if owner in names or owner.rpartition(".")[2].endswith("_quantizer"):
            keys.append(key)
    return keys


def grid_mismatch_message(mismatches: list[tuple[str, str, str]], total: int) -> str:
    """One error for all mismatches, grouped by (checkpoint grid, model grid), a few names each."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, found, expected in mismatches:
        groups[(found, expected)].append(name)
    lines = [
        f"  {len(names)} quantizer(s) {found!r} in the checkpoint, {expected!r} in this model: "
        f"{', '.join(sorted(names)[:4])}{', ...' if len(names) > 4 else ''}"
        for (found, expected), names in groups.items()
    ]
    return (
        f"MODEL.WEIGHTS: the checkpoint's quantizers were trained with other grids than this model's "
        f"MODEL.QUANTIZATION ({len(mismatches)} of {total} recorded quantizers differ):\n"
        + "\n".join(lines)
        + "\nTheir learned state (steps, ranges) does not fit these grids. Use the config the checkpoint was "
        f"trained with; or, {REINIT_HINT}."
    )


def attach_grid_check(model: nn.Module) -> None:
    """Refuse, before anything is loaded, a checkpoint whose recorded quantizer grids differ from the model's."""

    def before_load(module: nn.Module, state_dict, prefix: str, *args) -> None:
        mismatches = grid_mismatches(module, state_dict, prefix)
        if mismatches:
            total = sum(1 for key in state_dict if key.startswith(prefix) and key.endswith("." + RECIPE_KEY))
            raise ValueError(grid_mismatch_message(mismatches, total))

    model.register_load_state_dict_pre_hook(before_load)
