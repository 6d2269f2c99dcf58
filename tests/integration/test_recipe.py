"""The QAT recipe's training-time options through the patched build: distillation from the float teacher
(RetinaNet and FCOS), BN statistics frozen late in the schedule, progressive bit widths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .d2_helpers import ADET_CONFIG_DIR, CONFIG_DIR, load_cfg, shapes_batch

pytestmark = pytest.mark.integration

RETINANET = CONFIG_DIR / "shapes" / "retinanet_R_18_FPN_fullbn_lsq_w4a4.yaml"
FCOS = ADET_CONFIG_DIR / "shapes" / "fcos_R_18_FPN_fullbn_lsq_w4a4.yaml"


def _float_checkpoint(tmp_path: Path, config: Path) -> str:
    """A float model of `config`'s architecture (quantization off), trained one step so BN stats move."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    model = build_model(load_cfg(config, "MODEL.QUANTIZATION.ENABLED", False))
    model.train()
    with EventStorage(0):
        sum(model(shapes_batch(2)).values()).backward()
    DetectionCheckpointer(model, str(tmp_path)).save("float")
    return str(tmp_path / "float.pth")


def _student(config: Path, weights: str, *opts):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = load_cfg(config, "MODEL.WEIGHTS", weights, "MODEL.QUANTIZATION.DISTILLATION.ENABLED", True, *opts)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    return cfg, model


@pytest.mark.parametrize("config", [RETINANET, FCOS], ids=["retinanet", "fcos"])
def test_distillation_adds_finite_kd_losses_that_vanish_when_the_student_is_the_teacher(
    patched_tree, tmp_path, config
):
    from detectron2.utils.events import EventStorage

    weights = _float_checkpoint(tmp_path, config)
    opts = ["MODEL.QUANTIZATION.DISTILLATION.FEATURE_WEIGHT", 1.0]
    _, student = _student(config, weights, *opts)
    student.train()
    with EventStorage(0):
        losses = student(shapes_batch(2, seed=1))
    kd = {k: v for k, v in losses.items() if k.startswith("loss_kd_")}
    assert set(kd) == {"loss_kd_logits", "loss_kd_box", "loss_kd_feature"}
    assert all(torch.isfinite(v) and v.requires_grad for v in kd.values())
    assert any(float(v.detach()) > 0 for v in kd.values())
    sum(losses.values()).backward()
    # The teacher is frozen, in eval mode, and not part of the student (state dict, parameters).
    teacher = student.distillation.teacher
    assert not teacher.training and not any(
        p.requires_grad or p.grad is not None for p in teacher.parameters()
    )
    assert not any("teacher" in k for k in student.state_dict())
    assert {id(p) for p in teacher.parameters()}.isdisjoint(id(p) for p in student.parameters())
    float_state = torch.load(weights, weights_only=False)["model"]
    assert all(torch.equal(v, float_state[k]) for k, v in teacher.state_dict().items())

    # Student == teacher: quantization off everywhere (all bits "off"), BN statistics frozen from the
    # first iteration (the teacher runs in eval mode): the KD losses are exactly zero.
    off = ["MODEL.QUANTIZATION.WEIGHT.BITS", 0, "MODEL.QUANTIZATION.ACTIVATION.BITS", 0,
           "MODEL.QUANTIZATION.RULES", [], "MODEL.QUANTIZATION.FREEZE_BN_AFTER", 1e-9]  # fmt: skip
    _, same = _student(config, weights, *opts, *off)
    same.train()
    with EventStorage(0):
        losses = same(shapes_batch(2, seed=1))
    assert all(float(losses[k]) == 0.0 for k in kd)


def test_a_quantized_teacher_checkpoint_is_refused(patched_tree, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    quantized = build_model(load_cfg(RETINANET))
    quantized.train()
    with EventStorage(0):
        quantized(shapes_batch(2))
    DetectionCheckpointer(quantized, str(tmp_path)).save("qat")
    _, student = _student(RETINANET, str(tmp_path / "qat.pth"))
    student.train()
    with EventStorage(0), pytest.raises(ValueError, match="TEACHER_WEIGHTS=.* holds quantizer state"):
        student(shapes_batch(2))


def test_bn_statistics_freeze_at_the_configured_fraction_of_the_schedule(patched_tree):
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    cfg = load_cfg(RETINANET, "SOLVER.MAX_ITER", 4, "MODEL.QUANTIZATION.FREEZE_BN_AFTER", 0.5)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    norm = model.backbone.bottom_up.stem.conv1.norm
    conv = model.backbone.bottom_up.stem.conv1.weight
    model.train()
    history = []
    with EventStorage(0) as storage:
        for step in range(4):
            storage.iter = step
            before = norm.running_mean.clone(), conv.detach().clone()
            loss = sum(model(shapes_batch(2, seed=step)).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(
                (
                    not torch.equal(before[0], norm.running_mean),
                    not torch.equal(before[1], conv),
                    norm.training,
                )
            )
    # Steps 0-1 update the statistics; from step 2 (0.5 x 4) on they are frozen while the weights train.
    assert history == [(True, True, True), (True, True, True), (False, True, False), (False, True, False)]


def test_a_missing_teacher_checkpoint_is_an_error_naming_the_key(patched_tree, tmp_path):
    """The *_mixed recipe distills from MODEL.WEIGHTS: training one without the float checkpoint at hand says
    which key to set, at the first training step (building the model for inference or export needs none)."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    MIXED = CONFIG_DIR / "shapes" / "retinanet_R_18_FPN_fullbn_lsq_w4a4_mixed.yaml"
    missing = str(tmp_path / "nowhere" / "model_final.pth")
    no_weights = build_model(load_cfg(MIXED))  # MODEL.WEIGHTS "": builds (random weights), trains not
    no_weights.train()
    with EventStorage(0), pytest.raises(ValueError, match=r"DISTILLATION: no teacher: set .*TEACHER_WEIGHTS"):
        no_weights(shapes_batch(2))
    student = build_model(load_cfg(MIXED, "MODEL.WEIGHTS", missing))  # builds: the teacher loads lazily
    student.train()
    with (
        EventStorage(0),
        pytest.raises(ValueError, match=r"TEACHER_WEIGHTS \(or MODEL.WEIGHTS\)=.*nowhere.* no such file"),
    ):
        student(shapes_batch(2))
