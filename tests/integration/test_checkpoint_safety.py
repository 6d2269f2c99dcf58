"""Checkpoints through build_model + DetectionCheckpointer never run quantizers silently on the wrong state:
uninitialised evaluation, grid mismatches, REINIT_QUANTIZERS (issue 13, items 3 and 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .d2_helpers import CONFIG_DIR, load_cfg, quantizer_state, shapes_batch

pytestmark = pytest.mark.integration

SHAPES = CONFIG_DIR / "shapes"
FLOAT = SHAPES / "retinanet_R_18_FPN_fullbn_float.yaml"
W4A4 = SHAPES / "retinanet_R_18_FPN_fullbn_lsq_w4a4.yaml"
W2A2 = SHAPES / "retinanet_R_18_FPN_fullbn_lsq_w2a2.yaml"


def _images(n: int = 1) -> list[dict]:
    return [{k: v for k, v in x.items() if k != "instances"} for x in shapes_batch(n)]


def _train_and_save(config: Path, directory: Path, name: str, steps: int = 2, *opts) -> Path:
    """A real checkpoint of `config` after `steps` SGD steps (quantizers initialised from data)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    cfg = load_cfg(config, *opts)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    model.train()
    with EventStorage(0) as storage:
        for step in range(steps):
            storage.iter = step
            loss = sum(model(shapes_batch(2, seed=step)).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    DetectionCheckpointer(model, str(directory)).save(name)
    return directory / f"{name}.pth"


@pytest.fixture(scope="module")
def checkpoints(patched_tree, tmp_path_factory) -> dict[str, Path]:
    """A float RetinaNet checkpoint and a 4-bit QAT one (two steps), shared by the tests of this module."""
    directory = tmp_path_factory.mktemp("checkpoints")
    return {
        "float": _train_and_save(FLOAT, directory, "float", steps=0),
        "w4a4": _train_and_save(W4A4, directory, "w4a4"),
    }


def _build_and_load(config: Path, weights: Path, *opts):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = load_cfg(config, "MODEL.WEIGHTS", str(weights), *opts)
    model = build_model(cfg)
    DetectionCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    return model


# ----------------------------------------------------------------------------------- item 4


def test_a_float_checkpoint_evaluated_with_a_quantized_config_is_an_error(checkpoints) -> None:
    from model_quantization.quantizers import calibration

    model = _build_and_load(W4A4, checkpoints["float"]).eval()
    message = r"quantizer in 'backbone\..*never initialised.*[Tt]rain.*calibrat"
    with pytest.raises(RuntimeError, match=message), torch.no_grad():
        model(_images())
    assert not any(bool(v) for k, v in quantizer_state(model).items() if k.endswith("initialized"))
    # Calibration is the way to evaluate without training (post-training quantization): no error inside it.
    with calibration(model), torch.no_grad():
        model(_images())
    with torch.no_grad():
        model(_images())


def test_a_trained_quantized_checkpoint_evaluates(checkpoints) -> None:
    model = _build_and_load(W4A4, checkpoints["w4a4"]).eval()
    with torch.no_grad():
        outputs = model(_images())
    assert len(outputs) == 1 and "instances" in outputs[0]
