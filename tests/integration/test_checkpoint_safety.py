"""Checkpoints through build_model + DetectionCheckpointer never run quantizers silently on the wrong state:
uninitialised evaluation, grid mismatches, REINIT_QUANTIZERS (issue 13, items 3 and 4)."""

from __future__ import annotations

import logging
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


# ----------------------------------------------------------------------------------- item 3


def test_a_4bit_checkpoint_into_the_2bit_config_fails_naming_modules_and_the_way_out(checkpoints) -> None:
    with pytest.raises(ValueError) as error:
        _build_and_load(W2A2, checkpoints["w4a4"])
    message = str(error.value)
    assert "lsq 4-bit" in message and "lsq 2-bit" in message
    assert "backbone.bottom_up.res2.0.conv1.weight_quantizer" in message
    assert "MODEL.QUANTIZATION.REINIT_QUANTIZERS: True" in message


def test_a_checkpoint_written_before_grids_were_recorded_loads_without_a_check(checkpoints, tmp_path) -> None:
    data = torch.load(checkpoints["w4a4"], weights_only=False)
    expected = {k: v for k, v in data["model"].items() if "_quantizer." in k and not k.endswith(".recipe")}
    data["model"] = {k: v for k, v in data["model"].items() if not k.endswith(".recipe")}
    old = tmp_path / "old_format.pth"
    torch.save(data, old)
    model = _build_and_load(W4A4, old)
    state = model.state_dict()
    assert expected and all(torch.equal(state[k], v) for k, v in expected.items())


def _low_bit_backbone(directory: Path, config: Path, old_format: bool = False) -> Path:
    """The bottom-up state of a `config` model whose quantizers initialised from one batch."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    torch.manual_seed(2)
    source = build_model(load_cfg(config)).train()
    with EventStorage(0):
        source(shapes_batch(2))
    state = source.backbone.bottom_up.state_dict()
    if old_format:
        state = {k: v for k, v in state.items() if not k.endswith(".recipe")}
    path = directory / f"backbone_{config.stem}{'_old' if old_format else ''}.pth"
    torch.save(state, path)
    return path


def test_double_init_takes_a_low_bit_backbone_written_before_grids_were_recorded(
    checkpoints, tmp_path
) -> None:
    backbone = _low_bit_backbone(tmp_path, W4A4, old_format=True)
    model = _build_and_load(W4A4, checkpoints["float"], "MODEL.QUANTIZATION.BACKBONE_WEIGHTS", str(backbone))
    flags = {k: bool(v) for k, v in quantizer_state(model).items() if k.endswith("initialized")}
    assert all(v for k, v in flags.items() if k.startswith("backbone.bottom_up."))


def test_double_init_refuses_a_backbone_trained_with_another_grid(checkpoints, tmp_path) -> None:
    backbone = _low_bit_backbone(tmp_path, W4A4)
    with pytest.raises(RuntimeError, match=r"'backbone\.bottom_up\..*lsq 4-bit.*lsq 2-bit"):
        _build_and_load(W2A2, checkpoints["float"], "MODEL.QUANTIZATION.BACKBONE_WEIGHTS", str(backbone))


# ----------------------------------------------------------------------------------- REINIT_QUANTIZERS

REINIT = ("MODEL.QUANTIZATION.REINIT_QUANTIZERS", True)


def test_reinit_quantizers_starts_a_2bit_run_from_a_4bit_checkpoint(checkpoints, caplog) -> None:
    from detectron2.utils.events import EventStorage

    with caplog.at_level(logging.INFO, logger="model_quantization"):
        model = _build_and_load(W2A2, checkpoints["w4a4"], *REINIT)
    lines = [r.getMessage() for r in caplog.records if "REINIT_QUANTIZERS" in r.getMessage()]
    assert len(lines) == 1 and "dropped 312 quantizer entries (78 quantizers)" in lines[0], lines
    saved = torch.load(checkpoints["w4a4"], weights_only=False)["model"]
    state = model.state_dict()
    for key, value in saved.items():
        if "_quantizer." not in key:
            assert torch.equal(state[key], torch.as_tensor(value)), f"{key} did not load"
    assert not any(bool(v) for k, v in quantizer_state(model).items() if k.endswith("initialized"))
    model.train()
    with EventStorage(0):
        model(shapes_batch(2))
    quantizers = quantizer_state(model)
    assert all(bool(v) for k, v in quantizers.items() if k.endswith("initialized"))
    assert all(float(v.min()) > 0 for k, v in quantizers.items() if k.endswith(".step"))


def test_reinit_quantizers_keeps_the_state_of_this_runs_own_checkpoint(checkpoints, caplog) -> None:
    """--resume of a REINIT run loads its own checkpoint: re-initialising it would restart every step."""
    with caplog.at_level(logging.INFO, logger="model_quantization"):
        model = _build_and_load(W4A4, checkpoints["w4a4"], *REINIT)
    assert any("kept the checkpoint's quantizer state" in r.getMessage() for r in caplog.records)
    saved = torch.load(checkpoints["w4a4"], weights_only=False)["model"]
    for key, value in quantizer_state(model).items():
        assert torch.equal(value, saved[key]), key


def test_reinit_quantizers_drops_a_checkpoint_without_grid_records(checkpoints, tmp_path, caplog) -> None:
    data = torch.load(checkpoints["w4a4"], weights_only=False)
    data["model"] = {k: v for k, v in data["model"].items() if not k.endswith(".recipe")}
    torch.save(data, tmp_path / "old_format.pth")
    with caplog.at_level(logging.INFO, logger="model_quantization"):
        model = _build_and_load(W4A4, tmp_path / "old_format.pth", *REINIT)
    assert any("dropped 234 quantizer entries" in r.getMessage() for r in caplog.records)
    assert not any(bool(v) for k, v in quantizer_state(model).items() if k.endswith("initialized"))


def test_the_init_summary_of_a_resumed_run_says_the_quantizers_were_restored(checkpoints, caplog) -> None:
    from detectron2.utils.events import EventStorage

    model = _build_and_load(W4A4, checkpoints["w4a4"]).train()
    with caplog.at_level(logging.INFO, logger="model_quantization"), EventStorage(7):
        model(shapes_batch(2))
        model(shapes_batch(2, seed=1))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quantizers:")]
    assert lines == ["quantizers: 0 of 78 initialised from data; 78 restored from the checkpoint (lsq: 78)"]
