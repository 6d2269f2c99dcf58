"""Knowledge distillation from the float teacher: KD losses on a dense detector's raw head outputs.

The quantized student and its float teacher (the checkpoint QAT starts from, built from the same config
with quantization off, frozen, in eval mode) see the same batch. Per anchor (RetinaNet) or location (FCOS):

* logits: the binary KL divergence between the teacher's and the student's sigmoid class probabilities
  (the models' own sigmoid/focal formulation: one Bernoulli per class), summed over anchors and classes
  and divided by the teacher's soft object count (the sum over anchors of its highest class
  probability, at least 1), so it weighs like a focal loss normalised by its positives. It is exactly 0
  when the student's logits equal the teacher's.
* boxes: smooth-L1 (RetinaNet's deltas) or L1 (FCOS's distances) between the student's and the teacher's
  regression, and for FCOS the binary KL of the centerness, each weighted per anchor by the teacher's
  highest class probability: boxes matter where the teacher sees an object.
* features (optional): the mean squared difference of every FPN level, averaged over levels.

Each architecture has an adapter in :data:`DISTILLERS` (by meta-architecture class name) that says which
head module to read in the student and how to run the teacher's backbone and head without its
post-processing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry
from .config import DistillationConfig

__all__ = ["DISTILLERS", "DenseHeadOutputs", "Distiller", "binary_kl_with_logits", "distillation_losses"]


@dataclass
class DenseHeadOutputs:
    """A dense head's raw outputs, one tensor per FPN level (N, channels, H, W).

    Attributes:
        logits: class logits, ``A * K`` channels (A anchors per position, K classes).
        boxes: box regression, ``A * 4`` channels.
        quality: FCOS's centerness logits (``A`` channels), or None.
        features: the FPN levels the head read.
    """

    logits: list[torch.Tensor]
    boxes: list[torch.Tensor]
    quality: list[torch.Tensor] | None
    features: list[torch.Tensor]


def binary_kl_with_logits(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Element-wise KL(Bernoulli(sigmoid(t / T)) || Bernoulli(sigmoid(s / T))), stable for any logits."""
    target = torch.sigmoid(teacher / temperature)
    cross = F.binary_cross_entropy_with_logits(student / temperature, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher / temperature, target, reduction="none")
    return cross - entropy


def _per_anchor(levels: Sequence[torch.Tensor], channels_per_anchor: int) -> torch.Tensor:
    """Concatenate levels of (N, A * C, H, W) into (N, anchors, C)."""
    out = []
    for x in levels:
        n, _, h, w = x.shape
        out.append(
            x.view(n, -1, channels_per_anchor, h, w)
            .permute(0, 3, 4, 1, 2)
            .reshape(n, -1, channels_per_anchor)
        )
    return torch.cat(out, dim=1)


def distillation_losses(
    student: DenseHeadOutputs, teacher: DenseHeadOutputs, num_classes: int, config: DistillationConfig
) -> dict[str, torch.Tensor]:
    """The KD losses (``loss_kd_logits``, ``loss_kd_box``, ``loss_kd_feature``), weighted as configured."""
    t = config.temperature
    s_logits, t_logits = _per_anchor(student.logits, num_classes), _per_anchor(teacher.logits, num_classes)
    t_prob = torch.sigmoid(t_logits)
    # How much the teacher believes each anchor holds an object: the weight of its box and quality terms.
    objectness = t_prob.amax(dim=2)
    soft_count = objectness.sum().clamp_min(1.0)
    losses: dict[str, torch.Tensor] = {}
    if config.logits_weight:
        kl = binary_kl_with_logits(s_logits, t_logits, t).sum() * t * t / soft_count
        losses["loss_kd_logits"] = config.logits_weight * kl
    if config.box_weight:
        s_box, t_box = _per_anchor(student.boxes, 4), _per_anchor(teacher.boxes, 4)
        if teacher.quality is None:  # RetinaNet: anchor deltas
            box = F.smooth_l1_loss(s_box, t_box, beta=0.1, reduction="none").sum(dim=2)
        else:  # FCOS: distances to the box sides, and the centerness
            box = F.l1_loss(s_box, t_box, reduction="none").sum(dim=2)
            s_q, t_q = _per_anchor(student.quality, 1), _per_anchor(teacher.quality, 1)
            box = box + binary_kl_with_logits(s_q, t_q).squeeze(2)
        losses["loss_kd_box"] = config.box_weight * (box * objectness).sum() / soft_count
    if config.feature_weight:
        mse = [F.mse_loss(s, t_) for s, t_ in zip(student.features, teacher.features, strict=True)]
        losses["loss_kd_feature"] = config.feature_weight * torch.stack(mse).mean()
    return losses


class Distiller:
    """How to read one meta-architecture's dense head (subclasses per architecture).

    Attributes:
        num_classes: K, the class channels per anchor.
    """

    def __init__(self, model: nn.Module) -> None:
        self.num_classes = self._num_classes(model)

    def head(self, model: nn.Module) -> nn.Module:
        """The student's head module, whose forward outputs :meth:`outputs` reads."""
        raise NotImplementedError

    def outputs(self, head_output: Any, features: list[torch.Tensor]) -> DenseHeadOutputs:
        """:class:`DenseHeadOutputs` from the head module's return value and its input features."""
        raise NotImplementedError

    @torch.no_grad()
    def run_teacher(self, teacher: nn.Module, batched_inputs: list[dict]) -> DenseHeadOutputs:
        """The teacher's raw head outputs on ``batched_inputs`` (no post-processing, no gradients)."""
        raise NotImplementedError

    @staticmethod
    def _num_classes(model: nn.Module) -> int:
        raise NotImplementedError


def _normalised_images(model: nn.Module, batched_inputs: list[dict]) -> torch.Tensor:
    """detectron2's preprocessing: normalise, pad to the backbone's size divisibility, batch."""
    from detectron2.structures import ImageList

    images = [
        (x["image"].to(model.pixel_mean.device) - model.pixel_mean) / model.pixel_std for x in batched_inputs
    ]
    backbone = model.backbone
    return ImageList.from_tensors(
        images, backbone.size_divisibility, padding_constraints=backbone.padding_constraints
    ).tensor


DISTILLERS: Registry[type[Distiller]] = Registry("distillation adapter (meta-architecture)")


@DISTILLERS.register("RetinaNet")
class RetinaNetDistiller(Distiller):
    """detectron2's RetinaNet: ``model.head(features) -> (logits, bbox_reg)`` per level."""

    def head(self, model: nn.Module) -> nn.Module:
        return model.head

    def outputs(self, head_output: Any, features: list[torch.Tensor]) -> DenseHeadOutputs:
        logits, boxes = head_output
        return DenseHeadOutputs(list(logits), list(boxes), None, list(features))

    @torch.no_grad()
    def run_teacher(self, teacher: nn.Module, batched_inputs: list[dict]) -> DenseHeadOutputs:
        features = teacher.backbone(_normalised_images(teacher, batched_inputs))
        features = [features[f] for f in teacher.head_in_features]
        return self.outputs(teacher.head(features), features)

    @staticmethod
    def _num_classes(model: nn.Module) -> int:
        return model.num_classes


@DISTILLERS.register("OneStageDetector")
class FCOSDistiller(Distiller):
    """AdelaiDet's FCOS: ``fcos_head(features) -> (logits, bbox_reg, ctrness, top_feats, towers)``."""

    def head(self, model: nn.Module) -> nn.Module:
        return model.proposal_generator.fcos_head

    def outputs(self, head_output: Any, features: list[torch.Tensor]) -> DenseHeadOutputs:
        logits, boxes, quality = head_output[:3]
        return DenseHeadOutputs(list(logits), list(boxes), list(quality), list(features))

    @torch.no_grad()
    def run_teacher(self, teacher: nn.Module, batched_inputs: list[dict]) -> DenseHeadOutputs:
        features = teacher.backbone(_normalised_images(teacher, batched_inputs))
        generator = teacher.proposal_generator
        features = [features[f] for f in generator.in_features]
        return self.outputs(generator.fcos_head(features, None, False), features)

    @staticmethod
    def _num_classes(model: nn.Module) -> int:
        return model.proposal_generator.fcos_head.num_classes
