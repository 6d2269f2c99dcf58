"""Deploy, PyTorch side: grids -> Q/DQ parameters and int8 codes, exact BN folding, refusals by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_quantization import QuantSpec, convert
from model_quantization.deploy import ExportError
from model_quantization.deploy.grids import activation_qdq, weight_codes
from model_quantization.deploy.lowering import DeployConv2d, lower, reset_levels
from model_quantization.nn import DynamicConv2d
from tests.unit.deploy_helpers import LevelBN, images, quantized_toy
from tests.unit.quantizer_factory import make_quantizer


def _initialised(quantizer, x):
    quantizer.train()
    quantizer(x)
    return quantizer.eval()


@pytest.mark.parametrize(
    ("bits", "signed", "expected"),
    [(4, False, (0, 0, 15)), (2, False, (0, 0, 3)), (4, True, (128, 120, 135)), (8, True, (128, 0, 255))],
)
def test_activation_grids_become_uint8_qdq(bits, signed, expected):
    q = _initialised(make_quantizer("lsq", bits, signed), torch.randn(64) + (0 if signed else 3))
    spec = activation_qdq(q, "m.input_quantizer")
    assert (spec.zero_point, spec.low, spec.high) == expected
    x = torch.randn(1000) * 3
    codes = torch.clamp(torch.round(x / spec.scale) + spec.zero_point, spec.low, spec.high)
    assert torch.equal((codes - spec.zero_point) * spec.scale, q(x)), "the Q/DQ grid is the quantizer's grid"


def test_binary_activation_is_a_sign_grid_and_off_is_none():
    spec = activation_qdq(make_quantizer("binary", 1, True), "m.input_quantizer")
    assert spec.sign and spec.zero_point == 128 and (spec.low, spec.high) == (127, 129)
    assert activation_qdq(make_quantizer("lsq", None, False), "m.input_quantizer") is None


@pytest.mark.parametrize(
    ("quantizer", "why"),
    [
        (lambda: make_quantizer("lsq", 4, False), "never initialised from data"),
        (lambda: _initialised(make_quantizer("lqnet", 2, True), torch.randn(256)), "non-uniform"),
        (
            lambda: _initialised(make_quantizer("lsq", 4, True, learnable_offset=True), torch.randn(64)),
            "an LSQ. offset",
        ),
    ],
)
def test_quantizers_without_an_integer_grid_are_refused_by_name(quantizer, why):
    with pytest.raises(ExportError, match=rf"'head\.conv\.input_quantizer'.*{why}"):
        activation_qdq(quantizer(), "head.conv.input_quantizer")


@pytest.mark.parametrize(
    ("method", "bits", "granularity"),
    [("lsq", 8, "per_tensor"), ("lsq", 4, "per_channel"), ("lsq", 2, "per_tensor"), ("dorefa", 4, "per_tensor"),
     ("binary", 1, "per_channel"), ("minmax", 4, "per_channel")],
)  # fmt: skip
def test_weight_codes_are_the_quantizers_own_output(method, bits, granularity):
    weight = torch.randn(8, 4, 3, 3)
    q = make_quantizer(method, bits, True, granularity, role="weight", num_channels=8)
    q.train()
    q(weight)
    q.eval()
    w = weight_codes(q, weight, 0, "conv.weight_quantizer")
    assert w.codes.dtype == torch.int8 and w.scale.shape == (8,)
    # codes x scale is the fake-quant weight (bit for bit, except DoReFa's 2k/L - 1 written as (2k - L)/L)
    torch.testing.assert_close(w.dequantize(), q(weight), rtol=0, atol=1e-6)
    assert w.qmin <= int(w.codes.min()) and int(w.codes.max()) <= w.qmax
    assert len(torch.unique(w.codes)) <= 2**bits


def test_weights_that_do_not_fit_int8_are_refused():
    q = make_quantizer("dorefa", 8, True, role="weight")
    with pytest.raises(ExportError, match=r"'conv\.weight_quantizer'.*\[-255, 255\].*int8"):
        weight_codes(q, torch.randn(4, 4, 3, 3), 0, "conv.weight_quantizer")


def _conv_bn(gamma: torch.Tensor, weight_bits: int = 4) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(4, gamma.numel(), 3, padding=1), nn.BatchNorm2d(gamma.numel()))
    with torch.no_grad():
        model[1].weight.copy_(gamma)
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    spec = QuantSpec.from_dict(
        {
            "weight": {"method": "lsq", "bits": weight_bits},
            "activation": {"method": "lsq", "bits": 8, "signed": True},
        }
    )
    model, _ = convert(model, spec)
    model[0].weight_quantizer.train()
    model[0].weight_quantizer(model[0].weight)
    model[0].input_quantizer.train()
    model[0].input_quantizer(torch.randn(2, 4, 8, 8))
    return model.eval()


def test_bn_folds_into_scale_and_bias_and_negative_gamma_flips_codes(seed):
    gamma = torch.tensor([1.5, -0.7, 0.2, -2.0])
    model = _conv_bn(gamma)
    lowered, summary, _ = lower(model)
    conv = lowered[0]
    assert isinstance(conv, DeployConv2d) and isinstance(lowered[1], nn.Identity)
    assert summary.folded_norms == ["0 <- BatchNorm2d (1 levels)"]
    original = weight_codes(model[0].weight_quantizer, model[0].weight, 0, "0")
    sign = torch.sign(gamma).to(torch.int8).reshape(-1, 1, 1, 1)
    assert torch.equal(conv.codes_0, original.codes * sign), "folding must not re-round the integer weights"
    assert (conv.scale_0 > 0).all()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_flip_that_would_overflow_int8_keeps_the_codes_with_a_negative_scale():
    model = _conv_bn(torch.tensor([1.0, -1.0]), weight_bits=8)
    with torch.no_grad():  # put the grid's -128 code in the negative-gamma channel
        step = model[0].weight_quantizer.integer_grid().scale
        model[0].weight[1, 0, 0, 0] = -200 * step
    lowered, summary, _ = lower(model)
    assert summary.negative_scales == ["0: 1 channels"]
    assert int(lowered[0].codes_0[1].min()) == -128 and float(lowered[0].scale_0[1]) < 0
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-5, atol=1e-5)


def test_per_level_norms_share_one_set_of_codes():
    model = quantized_toy("lsq", 4)
    lowered, summary, _ = lower(model)
    tower = lowered.tower[0]
    assert tower.levels == 2 and tower.code_index == [0, 0] and not hasattr(tower, "codes_1")
    assert not torch.equal(tower.scale_0, tower.scale_1), "each level folds its own statistics"
    assert isinstance(lowered.tower[1], nn.Identity) and isinstance(model.tower[1], LevelBN)
    assert "tower.0 <- LevelBN (2 levels)" in summary.folded_norms
    x = images(2)
    reset_levels(lowered)
    with torch.no_grad():
        for got, expected in zip(lowered(x), model(x), strict=True):
            # lowered Q/DQ equals fake quant except where float summation order flips a rounding
            assert (got - expected).abs().gt(1e-3).float().mean() < 0.01


def test_lowering_leaves_the_model_untouched():
    model = quantized_toy("lsq", 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lower(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert type(model.conv1).__name__.startswith("QConv2d")


class _WithOwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2.0


class _Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = DynamicConv2d()
        self.weight = nn.Parameter(torch.randn(4, 3, 1, 1))

    def forward(self, x):
        return self.conv(x, self.weight)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(_WithOwnForward(3, 4, 1)), r"'0'.*_WithOwnForward has its own forward\(\)"),
        (_Dynamic(), r"'conv'.*no export handler for QDynamicConv2d"),
    ],
)
def test_modules_without_a_handler_or_epilogue_are_refused_by_name(model, message):
    spec = QuantSpec.from_dict(
        {"weight": {"method": "lsq", "bits": 4}, "activation": {"method": "lsq", "bits": 8}}
    )
    model, _ = convert(model, spec)
    model.train()
    model(F.relu(torch.randn(2, 3, 8, 8)))
    with pytest.raises(ExportError, match=message):
        lower(model.eval())
