"""Checkpoint guards the build hook attaches to a quantized model, so an unchanged ``train_net.py`` /
``DetectionCheckpointer`` never runs quantizers silently on state that belongs to another grid.

Both are load_state_dict pre-hooks on the model (like the double init of :mod:`.checkpoint`), so they see
every checkpoint loaded into it (``MODEL.WEIGHTS``, ``--resume``, ``--eval-only``):

* ``REINIT_QUANTIZERS`` (:func:`attach_reinit`): the quantizer state of a checkpoint is dropped, so the
  quantizers initialise from data again (progressive bit widths: a 2-bit run from a 4-bit QAT checkpoint).
  A checkpoint whose recorded grids are all this model's keeps its state: that is this run's own
  checkpoint (``--resume``, or evaluating it), and re-initialising it would silently restart the steps.
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

__all__ = ["attach_grid_check", "attach_reinit", "grid_mismatch_message", "quantizer_entries"]

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


def attach_reinit(model: nn.Module) -> None:
    """``REINIT_QUANTIZERS``: drop the quantizer state of loaded checkpoints (unless it is this model's own)."""

    def before_load(module: nn.Module, state_dict, prefix: str, *args) -> None:
        keys = quantizer_entries(module, state_dict, prefix)
        if not keys:
            logger.info(
                "REINIT_QUANTIZERS: the checkpoint has no quantizer state; quantizers initialise from data"
            )
            return
        recorded = [k for k in keys if k.endswith("." + RECIPE_KEY)]
        if recorded and not grid_mismatches(module, state_dict, prefix):
            logger.info(
                "REINIT_QUANTIZERS: kept the checkpoint's quantizer state (%d entries): its %d quantizers have "
                "this model's grids, so it is this run's own checkpoint (resume or evaluation)",
                len(keys), len(recorded),
            )  # fmt: skip
            return
        for key in keys:
            del state_dict[key]
        owners = {key.rpartition(".")[0] for key in keys}
        logger.info(
            "REINIT_QUANTIZERS: dropped %d quantizer entries (%d quantizers) of the checkpoint; the quantizers "
            "initialise from data again",
            len(keys), len(owners),
        )  # fmt: skip

    model.register_load_state_dict_pre_hook(before_load)
