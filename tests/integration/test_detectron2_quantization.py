"""Quantized detectron2 models through the patched tree: configs, reports, training + COCO evaluation,
float equivalence with the unpatched pin, checkpoint resume, bad configs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .d2_helpers import (
    CONFIG_DIR,
    ROOT,
    assert_resume_is_exact,
    assert_same_as_unpatched,
    build_and_check,
    config_files,
    double_init,
    load_cfg,
    quantizer_state,
    shapes_batch,
)

pytestmark = pytest.mark.integration

SHAPES = CONFIG_DIR / "shapes"


@pytest.mark.parametrize("path", config_files(), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_builds_and_leaves_nothing_silently_float(patched_tree, path: Path) -> None:
    cfg, _, quantized = build_and_check(path)
    if quantized is None:
        return
    # the configured bit widths are the ones in the model
    wbits = cfg.MODEL.QUANTIZATION.WEIGHT.BITS
    convs = [r for r in quantized.values() if r["type"] == "Conv2d" and not r["rules"].strip("-")]
    assert convs and all(str(r["w_bits"]) == str(wbits) for r in convs)


def _train_and_evaluate(tmp_path: Path, config: str, tasks, *opts):
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator

    cfg = load_cfg(
        SHAPES / config, "SOLVER.MAX_ITER", 3, "SOLVER.WARMUP_ITERS", 0, "OUTPUT_DIR", str(tmp_path), *opts
    )
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER  # train() leaves iter one past the last step
    evaluator = COCOEvaluator(
        "shapes_tiny_val", tasks=tuple(sorted(tasks)), output_dir=str(tmp_path / "eval")
    )
    results = DefaultTrainer.test(cfg, trainer.model, evaluators=[evaluator])
    return trainer, results


@pytest.mark.parametrize(
    "config, tasks",
    [
        ("retinanet_R_18_FPN_fullbn_lsq_w4a4.yaml", {"bbox"}),
        ("faster_rcnn_R_18_FPN_lsq_w4a4.yaml", {"bbox"}),
        ("mask_rcnn_R_18_FPN_lsq_w4a4.yaml", {"bbox", "segm"}),
    ],
)
def test_quantized_detectors_train_and_evaluate_with_coco(
    patched_tree, tmp_path: Path, config: str, tasks
) -> None:
    # A 3-iteration model scores everything below the default test thresholds: keep every candidate, so
    # that the evaluation has detections to match and its AP is a number.
    trainer, results = _train_and_evaluate(
        tmp_path, config, tasks, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
    )  # fmt: skip
    assert set(results) == tasks
    for task in tasks:
        assert {"AP", "AP50", "AP75"} <= set(results[task])
        # AP, AP50, AP75 are numbers; an area range with no objects (APl: none are large) is nan by COCO's rule
        assert all(
            math.isfinite(results[task][k]) and 0 <= results[task][k] <= 100 for k in ("AP", "AP50", "AP75")
        )
        assert all(math.isnan(v) or 0 <= v <= 100 for v in results[task].values()), results[task]
    detections = json.loads((tmp_path / "eval" / "coco_instances_results.json").read_text())
    assert detections and all(d["category_id"] in {1, 2, 3, 4} and len(d["bbox"]) == 4 for d in detections)
    state = quantizer_state(trainer.model)
    initialised = [k for k in state if k.endswith("initialized")]
    assert initialised and all(bool(state[k]) for k in initialised), "a quantizer was never initialised"


@pytest.mark.parametrize(
    "config", ["retinanet_R_18_FPN_fullbn_float.yaml", "faster_rcnn_R_18_FPN_lsq_w4a4.yaml"]
)
def test_quantization_off_is_identical_to_the_unpatched_pin(
    patched_tree, tmp_path: Path, config: str
) -> None:
    assert_same_as_unpatched(tmp_path, SHAPES / config)


def test_resume_restores_every_quantizer_and_the_next_loss(patched_tree, tmp_path: Path) -> None:
    # Faster R-CNN: RetinaNet's loss divides by an EMA of the positive-anchor count that upstream keeps as a
    # plain attribute, outside the checkpoint, so its resumed loss differs from the uninterrupted one.
    assert_resume_is_exact(tmp_path, SHAPES / "faster_rcnn_R_18_FPN_lsq_w4a4.yaml")


def test_float_checkpoint_loads_into_quantized_model_and_steps_init_from_data(
    patched_tree, tmp_path: Path
) -> None:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    float_model = build_model(load_cfg(SHAPES / "retinanet_R_18_FPN_fullbn_float.yaml"))
    DetectionCheckpointer(float_model, str(tmp_path)).save("float")
    cfg = load_cfg(
        SHAPES / "retinanet_R_18_FPN_fullbn_lsq_w2a2.yaml", "MODEL.WEIGHTS", str(tmp_path / "float.pth")
    )
    model = build_model(cfg)
    DetectionCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    for name, value in float_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), f"{name} did not load from the float checkpoint"
    assert not any(bool(v) for k, v in quantizer_state(model).items() if k.endswith("initialized"))
    model.train()
    with EventStorage(0):
        model(shapes_batch(2))
    state = quantizer_state(model)
    assert all(bool(v) for k, v in state.items() if k.endswith("initialized"))
    steps = [v for k, v in state.items() if k.endswith(".step")]
    assert steps and all(float(s.min()) > 0 for s in steps)


def test_quantizer_parameters_get_their_own_optimizer_settings(patched_tree) -> None:
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer

    cfg = load_cfg(
        SHAPES / "retinanet_R_18_FPN_fullbn_lsq_w4a4.yaml",
        "SOLVER.WEIGHT_DECAY", 1e-4, "MODEL.QUANTIZATION.QUANTIZER_LR_FACTOR", 0.1,
    )  # fmt: skip
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    steps = {id(p) for n, p in model.named_parameters() if n.endswith(".step")}
    convs = {id(p) for n, p in model.named_parameters() if n.endswith("conv1.weight")}
    assert steps and convs
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        if ids & steps:
            assert ids <= steps
            assert group["weight_decay"] == 0.0 and group["lr"] == pytest.approx(cfg.SOLVER.BASE_LR * 0.1)
        if ids & convs:
            assert group["weight_decay"] == 1e-4


@pytest.mark.parametrize(
    "opts, message",
    [
        # yacs itself rejects unknown keys (AssertionError from the command line, KeyError from a file).
        (["MODEL.QUANTIZATION.WIEGHT.BITS", 4], "Non-existent key: MODEL.QUANTIZATION.WIEGHT.BITS"),
        (
            ["MODEL.QUANTIZATION.WEIGHT.BITS", 9],
            r"MODEL.QUANTIZATION.WEIGHT.BITS: must be an integer in \[1, 8\]",
        ),
        (
            ["MODEL.QUANTIZATION.WEIGHT.METHOD", "lqs"],
            r"MODEL.QUANTIZATION.WEIGHT.METHOD: .*did you mean 'lsq'",
        ),
        (["MODEL.QUANTIZATION.RULES", [{"PATTERN": "head.cls_scroe", "SKIP": True}]], "head.cls_scroe"),
        (
            ["MODEL.QUANTIZATION.RULES", [{"PATERN": "head", "SKIP": True}]],
            r"RULES\[0\]: unknown key 'PATERN'",
        ),
        (["MODEL.QUANTIZATION.ACTIVATION.OPTIONS", {"GRAD_SCAL": False}], "did you mean 'grad_scale'"),
    ],
)
def test_bad_quantization_config_fails_before_training_naming_the_key(patched_tree, opts, message) -> None:
    from detectron2.modeling import build_model

    with pytest.raises((AssertionError, KeyError, ValueError), match=message):
        build_model(load_cfg(SHAPES / "retinanet_R_18_FPN_fullbn_lsq_w4a4.yaml", *opts))


def test_train_net_refuses_a_bad_config_before_training(patched_tree, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "external/detectron2/tools/train_net.py"), "--config-file",
         str(SHAPES / "retinanet_R_18_FPN_fullbn_lsq_w4a4.yaml"), "MODEL.WEIGHTS", "",
         "MODEL.QUANTIZATION.RULES", "[{'PATTERN': 'head.no_such_layer', 'WEIGHT': {'BITS': 8}}]",
         "OUTPUT_DIR", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "MODEL.QUANTIZATION.RULES[0]" in proc.stderr and "head.no_such_layer" in proc.stderr
    assert "Starting training" not in proc.stderr + proc.stdout


DDP_WORKER = r"""
import sys
import torch
from detectron2.engine import launch

sys.path.insert(0, sys.argv[3])  # the repository root, for tests.integration.d2_helpers


def main(config, out_dir, opts):
    from torch.nn.parallel import DistributedDataParallel
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage
    from tests.integration.d2_helpers import load_cfg, quantizer_state, shapes_batch

    torch.set_num_threads(1)
    rank = comm.get_rank()
    cfg = load_cfg(config, *opts)
    torch.manual_seed(rank)  # different initial weights too: DDP must broadcast rank 0's
    model = build_model(cfg)
    ddp = DistributedDataParallel(model)  # CPU module: no device_ids
    optimizer = build_optimizer(cfg, model)
    model.train()
    with EventStorage(0) as storage:
        for step in range(3):
            storage.iter = step
            loss = sum(ddp(shapes_batch(2, seed=100 * rank + step)).values())  # each rank its own images
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 0:
                torch.save(quantizer_state(model), f"{out_dir}/init{rank}.pt")
    # a prediction conv's bias: INTEGER_BIAS substitutes it during the forward, DDP must still sync it
    final = {**quantizer_state(model), "head.cls_score.bias": model.head.cls_score.bias.detach().clone()}
    torch.save(final, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    opts = [o if i % 2 == 0 else eval(o) for i, o in enumerate(sys.argv[4:])]
    launch(main, 2, dist_url="auto", args=(sys.argv[1], sys.argv[2], opts))
"""


#: INTEGER_BIAS and OUTPUT_QUANTIZERS (RetinaNet's INTEGER_OUTPUTS entry, as the worker eval()s it).
INTEGER_KERNELS = (
    "MODEL.QUANTIZATION.INTEGER_BIAS", "True",
    "MODEL.QUANTIZATION.OUTPUT_QUANTIZERS",
    "['backbone.bottom_up.stem.conv1', 'backbone.bottom_up.res*.*.conv2', 'backbone.bottom_up.res*.*.shortcut', "
    "'backbone.fpn_lateral*', 'backbone.fpn_output*', 'backbone.top_block.p*', 'head.cls_score', "
    "'head.bbox_pred']",
)  # fmt: skip


def test_the_ddp_integer_kernel_settings_are_retinanets_integer_outputs() -> None:
    from model_quantization.detectron2.architectures import INTEGER_OUTPUTS

    assert eval(INTEGER_KERNELS[3]) == list(INTEGER_OUTPUTS.get("RetinaNet"))


@pytest.mark.parametrize("opts", [(), INTEGER_KERNELS], ids=["plain", "integer_kernels"])
def test_ddp_two_gloo_processes_keep_quantizers_identical(patched_tree, tmp_path: Path, opts) -> None:
    config = SHAPES / "retinanet_R_18_FPN_fullbn_lsq_w4a4.yaml"
    worker = tmp_path / "ddp_worker.py"  # a file: spawned workers re-import __main__ to find main()
    worker.write_text(DDP_WORKER)
    proc = subprocess.run(
        [sys.executable, str(worker), str(config), str(tmp_path), str(ROOT), *opts],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage in ("init", "rank"):
        rank0 = torch.load(tmp_path / f"{stage}0.pt", weights_only=False)
        rank1 = torch.load(tmp_path / f"{stage}1.pt", weights_only=False)
        assert set(rank0) == set(rank1) and any(k.endswith(".step") for k in rank0)
        assert any(k.endswith("output_quantizer.step") and ".conv2." in k for k in rank0) == bool(opts)
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), f"{stage}: {key} differs between ranks"
    # The data differ per rank, so identical steps after the first batch mean the initial values were
    # averaged across ranks, and the later steps agree because their gradients are.
    init = torch.load(tmp_path / "init0.pt", weights_only=False)
    final = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert any(not torch.equal(init[k], final[k]) for k in init if k.endswith(".step")), "steps did not train"


def test_double_init_float_detector_then_quantized_backbone(patched_tree, tmp_path: Path) -> None:
    from detectron2.modeling import build_model

    config = SHAPES / "retinanet_R_18_FPN_fullbn_lsq_w2a2.yaml"
    float_state, backbone_state, model = double_init(
        tmp_path, SHAPES / "retinanet_R_18_FPN_fullbn_float.yaml", config, "backbone.bottom_up."
    )
    state = model.state_dict()
    for key, value in backbone_state.items():
        assert torch.equal(state[f"backbone.bottom_up.{key}"], value), key
    for key, value in float_state.items():
        if not key.startswith("backbone.bottom_up."):
            assert torch.equal(state[key], value), key
    quantizers = quantizer_state(model)
    assert all(
        bool(v)
        for k, v in quantizers.items()
        if k.startswith("backbone.bottom_up") and k.endswith("initialized")
    )
    assert not any(
        bool(v) for k, v in quantizers.items() if k.startswith("head") and k.endswith("initialized")
    )

    # Resuming a QAT checkpoint (it has the backbone's quantizer state) must not re-apply the backbone file.
    trained = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(trained, strict=False)
    assert torch.equal(
        model.state_dict()["backbone.bottom_up.stem.conv1.weight"],
        trained["backbone.bottom_up.stem.conv1.weight"],
    )

    bad = load_cfg(config, "MODEL.QUANTIZATION.BACKBONE_WEIGHTS", str(tmp_path / "float_detector.pth"))
    with pytest.raises(ValueError, match="BACKBONE_WEIGHTS=.*does not match the quantized backbone"):
        build_model(bad)
