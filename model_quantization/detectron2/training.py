"""Training-time parts of the QAT recipe, attached by the build hook so an unchanged ``train_net.py`` gets
them: knowledge distillation from the float teacher, and freezing BN statistics late in the schedule.

Both work through hooks on the built model, so its class, parameters and checkpoints are unchanged:

* distillation (``MODEL.QUANTIZATION.DISTILLATION``): forward hooks keep the student's head outputs and
  the features it read; after a training forward, the teacher (built lazily from the same config with
  quantization off, its weights from ``TEACHER_WEIGHTS`` or ``MODEL.WEIGHTS``, frozen, eval mode, kept
  outside the student's state dict and parameters) runs on the same batch and the KD losses
  (:mod:`.distillation`) join the loss dict, so detectron2's trainer sums, logs and back-propagates them.
* ``FREEZE_BN_AFTER``: from that fraction of ``SOLVER.MAX_ITER`` on, every BatchNorm normalises with and
  keeps its running statistics (eval mode) while the rest of the model trains, so the last iterations
  train against the statistics inference will use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compile import compile_detector
from .config import QuantizationConfig, float_config
from .distillation import DISTILLERS, Distiller, distillation_losses

__all__ = ["attach_training_hooks", "build_teacher"]

logger = logging.getLogger(__name__)


def _iteration(fallback: int) -> int:
    """The trainer's iteration (detectron2's event storage), or ``fallback`` outside a trainer."""
    from detectron2.utils.events import get_event_storage

    try:
        return get_event_storage().iter
    except AssertionError:  # no EventStorage context: not inside a detectron2 trainer
        return fallback


def _freeze_bn_statistics(model: nn.Module, cfg, config: QuantizationConfig) -> None:
    freeze_at = round(config.freeze_bn_after * cfg.SOLVER.MAX_ITER)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("MODEL.QUANTIZATION.FREEZE_BN_AFTER is set, but the model has no BatchNorm")
    calls = [0]
    announced = [False]

    def before_forward(module: nn.Module, args: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return  # inference, or a statistics-only pass (PreciseBN re-estimates them on purpose)
        calls[0] += 1
        if _iteration(calls[0] - 1) < freeze_at:
            return
        # The trainer (and evaluation's inference_context) put the whole model back in train mode.
        for norm in norms:
            norm.train(False)
        if not announced[0]:
            logger.info(
                "BN statistics frozen from iteration %d on (%d BatchNorm layers)", freeze_at, len(norms)
            )
            announced[0] = True

    model.register_forward_pre_hook(before_forward)


def build_teacher(cfg, weights: str) -> nn.Module:
    """The float teacher: ``cfg`` with quantization off, weights from ``weights``, frozen, in eval mode.

    Raises:
        ValueError: ``weights`` is not a file, holds quantizer state (a QAT checkpoint is not the float teacher) or does not
            fit the float model.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    # Checked here, not when the config is parsed: only training needs it. URLs are the checkpointer's.
    if not weights:
        raise ValueError(
            "MODEL.QUANTIZATION.DISTILLATION: no teacher: set DISTILLATION.TEACHER_WEIGHTS (or MODEL.WEIGHTS) "
            "to the float model's checkpoint, or set MODEL.QUANTIZATION.DISTILLATION.ENABLED False"
        )
    if "://" not in weights and not Path(weights).is_file():
        raise ValueError(
            f"MODEL.QUANTIZATION.DISTILLATION.TEACHER_WEIGHTS (or MODEL.WEIGHTS)={weights!r}: no such file; "
            f"distillation needs the float checkpoint the fine-tune starts from (train the float config first, "
            f"or set MODEL.QUANTIZATION.DISTILLATION.ENABLED False)"
        )
    teacher_cfg = float_config(cfg)
    teacher_cfg.defrost()
    teacher_cfg.MODEL.WEIGHTS = weights
    teacher = build_model(teacher_cfg)

    class FloatOnly(DetectionCheckpointer):
        """Refuses quantizer state and keeps what did not load, for the checks below."""

        def _load_model(self, checkpoint):
            quantizer_keys = [k for k in checkpoint["model"] if "_quantizer." in k]
            if quantizer_keys:
                raise ValueError(
                    f"MODEL.QUANTIZATION.DISTILLATION.TEACHER_WEIGHTS={weights!r} holds quantizer state "
                    f"({quantizer_keys[0]}, ...): the teacher is the float model; set TEACHER_WEIGHTS to the "
                    f"float checkpoint (e.g. when MODEL.WEIGHTS is a higher-bit QAT run)"
                )
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    checkpointer = FloatOnly(teacher)
    checkpointer.load(weights)
    if checkpointer.incompatible.missing_keys:
        raise ValueError(
            f"MODEL.QUANTIZATION.DISTILLATION.TEACHER_WEIGHTS={weights!r} does not fit the float model "
            f"(missing: {', '.join(checkpointer.incompatible.missing_keys[:5])})"
        )
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class _Distillation:
    """The teacher (built on first use) and what the last student forward produced; not an nn.Module, so
    the teacher stays out of the student's state dict, parameters, ``.to()`` and DDP."""

    def __init__(self, cfg, config: QuantizationConfig, distiller: Distiller) -> None:
        self.cfg = cfg.clone()
        self.config = config.distillation
        self.distiller = distiller
        self.teacher: nn.Module | None = None
        self.head_output: Any = None
        self.features: list[torch.Tensor] | None = None

    def capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self.head_output, self.features = output, list(args[0])

    def add_losses(self, module: nn.Module, args: Any, output: Any) -> Any:
        head_output, features = self.head_output, self.features
        self.head_output = self.features = None
        if (
            not (module.training and torch.is_grad_enabled() and isinstance(output, dict))
            or head_output is None
        ):
            return output  # inference, or a no-grad pass (PreciseBN's statistics): no KD
        if self.teacher is None:
            self.teacher = build_teacher(self.cfg, self.config.teacher_weights)
            logger.info("Distillation teacher loaded from %s", self.config.teacher_weights)
        student = self.distiller.outputs(head_output, features)
        teacher = self.distiller.run_teacher(self.teacher, args[0])
        return {**output, **distillation_losses(student, teacher, self.distiller.num_classes, self.config)}


def _distill(model: nn.Module, cfg, config: QuantizationConfig) -> None:
    arch = type(model).__name__
    if arch not in DISTILLERS:
        raise ValueError(
            f"MODEL.QUANTIZATION.DISTILLATION: no distillation adapter for {arch} (known: "
            f"{', '.join(DISTILLERS.names())})"
        )
    distiller = DISTILLERS.get(arch)(model)
    state = _Distillation(cfg, config, distiller)
    distiller.head(model).register_forward_hook(state.capture)
    model.register_forward_hook(state.add_losses)
    model.distillation = state


def attach_training_hooks(model: nn.Module, cfg, config: QuantizationConfig) -> None:
    """Attach the configured training-time parts of the recipe (distillation, BN freezing, compilation)."""
    if config.compile:  # MODEL.QUANTIZATION.COMPILE: compiled from the second batch on (see .compile)
        compile_detector(model)
    if config.freeze_bn_after:
        _freeze_bn_statistics(model, cfg, config)
    if config.distillation is not None:
        _distill(model, cfg, config)
