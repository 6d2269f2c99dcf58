"""The KD losses on dense head outputs: zero when the student equals the teacher, and what they weigh."""

from __future__ import annotations

import pytest
import torch

from model_quantization.detectron2.config import DistillationConfig
from model_quantization.detectron2.distillation import (
    DenseHeadOutputs,
    binary_kl_with_logits,
    distillation_losses,
)

CONFIG = DistillationConfig(teacher_weights="unused", logits_weight=1.0, box_weight=2.0, feature_weight=0.5)


def _outputs(seed: int, quality: bool, anchors: int = 3, classes: int = 4) -> DenseHeadOutputs:
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 16, 8, 8), (2, 16, 4, 4)]

    def levels(channels: int) -> list[torch.Tensor]:
        return [torch.randn(n, channels, h, w, generator=g) * 3 for n, _, h, w in shapes]

    return DenseHeadOutputs(
        logits=levels(anchors * classes),
        boxes=levels(anchors * 4),
        quality=levels(anchors) if quality else None,
        features=[torch.randn(s, generator=g) for s in shapes],
    )


@pytest.mark.parametrize("quality", [False, True], ids=["retinanet", "fcos"])
def test_losses_are_zero_when_the_student_is_the_teacher_and_positive_otherwise(quality):
    teacher = _outputs(0, quality)
    losses = distillation_losses(teacher, teacher, 4, CONFIG)
    assert set(losses) == {"loss_kd_logits", "loss_kd_box", "loss_kd_feature"}
    assert all(float(v) == 0.0 for v in losses.values())
    student = _outputs(1, quality)
    for tensors in (*student.logits, *student.boxes, *student.features):
        tensors.requires_grad_(True)
    losses = distillation_losses(student, teacher, 4, CONFIG)
    assert all(torch.isfinite(v) and float(v.detach()) > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in student.logits + student.boxes)


def test_binary_kl_is_the_bernoulli_kl_divergence():
    s, t = torch.tensor([-2.0, 0.5, 4.0]), torch.tensor([1.0, 0.5, -3.0])
    p, q = torch.sigmoid(t), torch.sigmoid(s)
    expected = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    torch.testing.assert_close(binary_kl_with_logits(s, t), expected)


def test_box_loss_counts_only_where_the_teacher_sees_objects():
    teacher = _outputs(0, False)
    for logits in teacher.logits:  # the teacher sees nothing anywhere...
        logits.fill_(-30.0)
    teacher.logits[0][0, :4, 2, 3] = 30.0  # ...but one anchor of one position
    student = _outputs(0, False)
    student.boxes = [b.clone() for b in teacher.boxes]
    student.boxes[1] += 5.0  # wrong everywhere on the second level, where the teacher sees nothing
    box = distillation_losses(student, teacher, 4, CONFIG)["loss_kd_box"]
    assert float(box) < 1e-6
    student.boxes[0][0, :4, 2, 3] += 1.0  # wrong where it sees the object
    assert float(distillation_losses(student, teacher, 4, CONFIG)["loss_kd_box"]) > 0.5
