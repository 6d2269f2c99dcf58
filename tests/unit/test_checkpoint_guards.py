"""Checkpoints and evaluation never run a quantizer silently on the wrong state (issue 13, items 3 and 4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_quantization import convert
from model_quantization.quantizers import calibration
from tests.unit.quantizer_factory import make_quantizer


def _float_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))


def _quantized(bits: int = 4, **activation) -> nn.Module:
    spec = {
        "weight": {"method": "lsq", "bits": bits},
        "activation": {"method": "lsq", "bits": bits, "signed": True, **activation},
    }
    return convert(_float_model(), spec)[0]


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 10, 10)


# ----------------------------------------------------------------------------------- item 4


def test_evaluating_a_model_whose_quantizers_were_never_initialised_is_an_error():
    model = _quantized()
    model.load_state_dict(_float_model().state_dict(), strict=True)  # a float checkpoint
    model.eval()
    with pytest.raises(
        RuntimeError, match=r"lsq quantizer in '0 \(input\)'.*never initialised.*train.*calibrat"
    ):
        model(_images())
    assert not model[0].input_quantizer.is_initialized  # the evaluation batch did not initialise it


def test_evaluation_after_training_or_calibration_or_loading_a_trained_checkpoint_works(seed):
    trained = _quantized()
    trained(_images())  # a training forward initialises
    trained.eval()
    reference = trained(_images())

    calibrated = _quantized().eval()
    with calibration(calibrated):
        calibrated(_images())
    assert torch.isfinite(calibrated(_images())).all()

    restored = _quantized()
    restored.load_state_dict(trained.state_dict(), strict=True)
    restored.eval()
    assert restored(_images()).shape == reference.shape


def test_quantizers_without_data_driven_state_evaluate_from_the_start():
    for q in (
        make_quantizer("lsq", 4, True, init_value=0.1),
        make_quantizer("pact", 4),
        make_quantizer("dorefa", 4),
    ):
        q.eval()
        assert torch.isfinite(q(torch.rand(8))).all()


def test_the_error_says_when_training_only_ever_fed_all_zero_batches():
    q = make_quantizer("lsq", 4, True)
    q.owner = "head.conv (input)"
    q(torch.zeros(4, 4))
    q.eval()
    with pytest.raises(RuntimeError, match=r"'head\.conv \(input\)'.*all zeros"):
        q(torch.rand(4, 4))
