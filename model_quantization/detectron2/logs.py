"""What the quantization package logs reaches detectron2's training log, and one line says how every
quantizer got its initial state.

* :func:`route_to_detectron2_log`: ``tools/train_net.py`` (detectron2's and AdelaiDet's, unchanged) calls
  ``default_setup``, which gives the ``detectron2`` and ``fvcore`` loggers (AdelaiDet's also ``adet``) a
  console handler and a ``OUTPUT_DIR/log.txt`` file handler and stops them propagating to the root logger.
  The ``model_quantization`` logger had no handler there, so the conversion report went nowhere.
* :func:`attach_init_summary`: after the training forward in which the last pending quantizer initialised,
  one line: ``quantizers: 78 of 78 initialised from data at iteration 0 (lsq: 78)``, plus how many were
  restored from a checkpoint, set by ``init_value`` or have no data-driven state. The hooks remove
  themselves then: nothing stays on the training path.
"""

from __future__ import annotations

import logging
from collections import Counter

from torch import nn

from ..quantizers import Quantizer

__all__ = ["attach_init_summary", "route_to_detectron2_log"]

logger = logging.getLogger(__name__)
PACKAGE_LOGGER = "model_quantization"


def route_to_detectron2_log() -> None:
    """Give the ``model_quantization`` logger the handlers detectron2's logger has (console, log.txt).

    Why the same handlers rather than logging under a child of ``detectron2``: the torch-only half of the
    package (quantizers: initialisation warnings) cannot log under detectron2's name, and this covers every
    module of the package with one call, with detectron2's own format, files and per-rank handling
    (``log.txt.rank<N>`` on other ranks) and no change to any logger name. Like detectron2's own loggers,
    ours then stops propagating to the root logger: a handler there (an application's ``basicConfig``, or
    pytest's capture handler, which sits on every non-propagating logger too) would otherwise handle each
    record a second time. A no-op until detectron2's logger has handlers (``default_setup``), so library
    use is unaffected; idempotent (the model is built more than once per process, e.g. for evaluation).
    """
    detectron2 = logging.getLogger("detectron2")
    if not detectron2.handlers:
        return
    ours = logging.getLogger(PACKAGE_LOGGER)
    for handler in detectron2.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = False
    if ours.level == logging.NOTSET:  # else the root logger's WARNING would drop the report
        ours.setLevel(logging.INFO)


def _iteration(fallback: int) -> int:
    """detectron2's current iteration (its event storage), or ``fallback`` outside a trainer."""
    from detectron2.utils.events import get_event_storage

    try:
        return get_event_storage().iter
    except AssertionError:  # no EventStorage: not inside a detectron2 trainer
        return fallback


def _counts(quantizers: list[Quantizer]) -> str:
    return ", ".join(f"{method}: {n}" for method, n in sorted(Counter(q.method for q in quantizers).items()))


def attach_init_summary(model: nn.Module) -> None:
    """Log one line when the quantizers pending at the first training forward are all initialised."""
    enabled = [m for m in model.modules() if isinstance(m, Quantizer) and m.enabled]
    if not enabled:
        return
    state: dict = {"pending": None, "forwards": 0, "first": 0}
    handles = []

    def before_forward(module: nn.Module, args) -> None:
        if not module.training or state["pending"] is not None:
            return
        data_driven = [q for q in enabled if q.data_driven]
        state["pending"] = [q for q in data_driven if not q.is_initialized]
        done = [q for q in data_driven if q.is_initialized]
        state["preset"] = [q for q in done if int(q.init_batches_seen) == 0]  # init_value
        state["restored"] = [q for q in done if int(q.init_batches_seen) > 0]
        state["stateless"] = [q for q in enabled if not q.data_driven]
        state["first"] = _iteration(0)

    def after_forward(module: nn.Module, args, output) -> None:
        if not module.training or state["pending"] is None:
            return
        state["forwards"] += 1
        pending = state["pending"]
        if not all(q.is_initialized for q in pending):
            return  # init_batches > 1, or an input that was all zeros so far (warned by name)
        last = _iteration(state["forwards"] - 1)
        when = f"iteration {last}" if last == state["first"] else f"iterations {state['first']}-{last}"
        line = f"quantizers: {len(pending)} of {len(enabled)} initialised from data"
        if pending:
            line += f" at {when} ({_counts(pending)})"
        extras = [
            f"{len(state[key])} {label} ({_counts(state[key])})"
            for key, label in (
                ("restored", "restored from the checkpoint"),
                ("preset", "set by init_value"),
                ("stateless", "without data-driven state"),
            )
            if state[key]
        ]
        logger.info("%s%s", line, "; " + ", ".join(extras) if extras else "")
        for handle in handles:
            handle.remove()

    handles.append(model.register_forward_pre_hook(before_forward))
    handles.append(model.register_forward_hook(after_forward))
