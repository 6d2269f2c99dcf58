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


# ----------------------------------------------------------------------------------- item 3


def _trained(bits: int = 4, **activation) -> nn.Module:
    model = _quantized(bits, **activation)
    model(_images())
    return model


def test_every_enabled_quantizer_records_its_grid_in_the_state_dict():
    model = _trained()
    state = model.state_dict()
    recipe = state["0.input_quantizer.recipe"]
    assert recipe.dtype == torch.uint8 and recipe.shape == (64,)
    assert bytes(recipe.tolist()).rstrip(b"\0").decode() == "lsq 4-bit signed per_tensor"
    assert (
        bytes(state["3.weight_quantizer.recipe"].tolist()).rstrip(b"\0").decode()
        == "lsq 4-bit signed per_tensor"
    )
    assert not make_quantizer("lsq", None, True).state_dict()  # "off" still holds nothing
    float_keys = set(_float_model().state_dict())
    assert {k for k in state if "quantizer" not in k} == float_keys  # float parameters unchanged


@pytest.mark.parametrize(
    "other, expected",
    [
        (dict(bits=2), "lsq 2-bit signed per_tensor"),
        (dict(signed=False), "lsq 4-bit unsigned per_tensor"),
        (dict(method="pact", signed=False), "pact 4-bit unsigned per_tensor"),
    ],
)
def test_a_checkpoint_with_another_grid_is_refused_naming_the_modules(seed, other, expected):
    bits = other.pop("bits", 4)
    target = _quantized(bits, **other)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError) as error:
        target.load_state_dict(_trained().state_dict())
    message = str(error.value)
    assert (
        "'0.input_quantizer'" in message and "lsq 4-bit signed per_tensor" in message and expected in message
    )
    refused = [k for k in before if k.startswith("0.input_quantizer.")]
    assert refused and all(torch.equal(before[k], target.state_dict()[k]) for k in refused)


def test_a_per_channel_checkpoint_into_a_per_tensor_model_is_refused():
    spec = {
        "weight": {"method": "lsq", "bits": 4, "granularity": "per_channel"},
        "activation": {"bits": 4, "signed": True},
    }
    source = convert(_float_model(), spec)[0]
    source(_images())
    with pytest.raises(RuntimeError, match=r"'0\.weight_quantizer'.*per_channel.*per_tensor"):
        _quantized().load_state_dict(source.state_dict())


def test_quantizer_state_for_a_quantizer_that_is_off_here_is_refused():
    spec = {"weight": {"method": "lsq", "bits": 4}, "activation": {"method": "lsq", "bits": "off"}}
    target = convert(_float_model(), spec)[0]
    with pytest.raises(RuntimeError, match=r"'0\.input_quantizer'.*lsq 4-bit signed per_tensor.*off"):
        target.load_state_dict(_trained().state_dict(), strict=False)


def test_checkpoints_written_before_grids_were_recorded_load_strictly_without_a_check(seed):
    trained = _trained()
    old = {k: v for k, v in trained.state_dict().items() if not k.endswith(".recipe")}
    restored = _quantized()
    restored.load_state_dict(old, strict=True)
    restored.eval()
    trained.eval()
    x = _images()
    assert torch.equal(restored(x), trained(x))
    # No record, no check: an old 4-bit checkpoint still loads into a 2-bit model (same state shapes).
    _quantized(2).load_state_dict(old, strict=True)
