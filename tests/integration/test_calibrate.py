"""Post-training quantization through the patched build: calibrate a float detector on training images
(no training), frozen ranges, evaluation that initialises nothing, checkpoints, the CLI, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .d2_helpers import ADET_CONFIG_DIR, CONFIG_DIR, ROOT, load_cfg, quantizer_state, shapes_batch

pytestmark = pytest.mark.integration

RETINANET_PTQ = CONFIG_DIR / "shapes" / "retinanet_R_18_FPN_fullbn_ptq_w8a8.yaml"
FCOS_PTQ = ADET_CONFIG_DIR / "shapes" / "fcos_R_18_FPN_fullbn_ptq_w4a8.yaml"
TINY = ("DATASETS.TRAIN", ("shapes_tiny_train",), "DATASETS.TEST", ("shapes_tiny_val",))


def _float_weights(tmp_path: Path, config: Path) -> str:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from model_quantization.detectron2.config import float_config

    torch.manual_seed(0)
    # quantization off: what only applies to QAT (the *_mixed recipe's distillation and deploy options)
    # goes off too
    model = build_model(float_config(load_cfg(config)))
    DetectionCheckpointer(model, str(tmp_path)).save(f"float_{config.stem}")
    return str(tmp_path / f"float_{config.stem}.pth")


def _inputs(n: int = 2) -> list[dict]:
    return [{k: v for k, v in x.items() if k != "instances"} for x in shapes_batch(n, seed=5)]


@pytest.mark.parametrize("config", [RETINANET_PTQ, FCOS_PTQ], ids=["retinanet_w8a8", "fcos_w4a8"])
def test_calibration_sets_and_freezes_every_quantizer_and_the_checkpoint_round_trips(
    patched_tree, tmp_path, config
):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from model_quantization.calibrate import calibrate_detector, load_float_weights

    weights = _float_weights(tmp_path, config)
    cfg = load_cfg(config, "MODEL.WEIGHTS", weights)
    model = build_model(cfg)
    load_float_weights(model, weights)
    model.eval()
    # Before calibration, evaluation refuses to initialise anything from test images.
    with torch.no_grad(), pytest.raises(RuntimeError, match="never initialised from data"):
        model(_inputs())
    report = calibrate_detector(cfg, model, num_images=8)
    assert report.images == 8 and sum(report.methods.values()) == len(
        model.quantization_report.quantized
    ) * 2 - sum(1 for r in model.quantization_report.quantized if r.w_bits == "-")
    calibrated = quantizer_state(model)
    assert calibrated and all(bool(v) for k, v in calibrated.items() if k.endswith("initialized"))
    # Frozen: more inference (and a training-mode pass) changes no quantizer state.
    with torch.no_grad(), EventStorage(0):
        model(_inputs())
        model.train()
        model(shapes_batch(2, seed=7))
        model.eval()
        first = model(_inputs())
    assert all(torch.equal(v, quantizer_state(model)[k]) for k, v in calibrated.items())
    # The calibrated checkpoint loads into a fresh model (no calibration) and predicts the same.
    DetectionCheckpointer(model, str(tmp_path)).save("calibrated")
    fresh = build_model(cfg)
    DetectionCheckpointer(fresh).load(str(tmp_path / "calibrated.pth"))
    fresh.eval()
    with torch.no_grad():
        again = fresh(_inputs())
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)


def test_lsq_steps_are_calibrated_by_their_init_estimator_over_every_batch(patched_tree, tmp_path):
    from detectron2.modeling import build_model

    from model_quantization.calibrate import calibrate_detector, load_float_weights

    config = CONFIG_DIR / "shapes" / "retinanet_R_18_FPN_fullbn_lsq_w4a4_mixed.yaml"
    weights = _float_weights(tmp_path, config)
    cfg = load_cfg(
        config, "MODEL.WEIGHTS", weights, "MODEL.QUANTIZATION.ACTIVATION.OPTIONS", {"INIT_METHOD": "mse"}
    )
    model = build_model(cfg)
    load_float_weights(model, weights)
    report = calibrate_detector(cfg, model, num_images=8)
    assert set(report.methods) == {"lsq"} and "lsq" in str(report)
    seen = {k: int(v) for k, v in quantizer_state(model).items() if k.endswith("init_batches_seen")}
    # 8 images in batches of 2: every batch folded in, not just the first (the shared head: once per level)
    assert set(seen.values()) == {4, 4 * len(cfg.MODEL.RETINANET.IN_FEATURES)}


def test_bad_input_is_an_error_naming_it(patched_tree, tmp_path):
    from detectron2.modeling import build_model

    from model_quantization.calibrate import calibrate_detector, calibration_loader, load_float_weights

    cfg = load_cfg(RETINANET_PTQ)
    with pytest.raises(ValueError, match="calibrate on at least 8 images"):
        calibration_loader(cfg, 4)
    with pytest.raises(ValueError, match=r"DATASETS.TRAIN \('shapes_tiny_train',\) holds only 24 images"):
        calibration_loader(cfg, 100)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="does not fit the model of this config .* another architecture"):
        load_float_weights(model, _float_weights(tmp_path, FCOS_PTQ))
    with pytest.raises(ValueError, match="no such file"):
        load_float_weights(model, str(tmp_path / "missing.pth"))
    float_model = build_model(load_cfg(RETINANET_PTQ, "MODEL.QUANTIZATION.ENABLED", False))
    with pytest.raises(ValueError, match="nothing to calibrate: the model has no quantizers"):
        calibrate_detector(cfg, float_model, num_images=8)


def test_cli_refuses_a_float_config(patched_tree, tmp_path):
    float_config = CONFIG_DIR / "shapes" / "retinanet_R_18_FPN_fullbn_float.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "model_quantization.calibrate", "--config-file", str(float_config), "--weights",
         _float_weights(tmp_path, RETINANET_PTQ), "--no-eval", *map(str, TINY), "MODEL.DEVICE", "cpu",
         "OUTPUT_DIR", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "a float config (MODEL.QUANTIZATION.ENABLED is False)" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_calibrates_evaluates_and_writes_a_checkpoint(patched_tree, tmp_path):
    weights = _float_weights(tmp_path, RETINANET_PTQ)
    output = tmp_path / "calibrated.pth"
    proc = subprocess.run(
        [sys.executable, "-m", "model_quantization.calibrate", "--config-file", str(RETINANET_PTQ), "--weights",
         weights, "--images", "8", "--output", str(output), *map(str, TINY), "MODEL.DEVICE", "cpu",
         "SOLVER.IMS_PER_BATCH", "4"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert output.is_file() and "| float |" in proc.stdout and "| calibrated (8 images) |" in proc.stdout
    assert "on 8 images (2 batches)" in proc.stdout + proc.stderr
