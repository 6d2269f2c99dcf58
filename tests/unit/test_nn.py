"""Quantized layers against hand-written functional equivalents; Add."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_quantization.nn import (
    Add,
    QAdd,
    QConv2d,
    QConvTranspose2d,
    QLinear,
    quantized_class,
    quantized_module_for,
)
from model_quantization.quantizers import LSQQuantizer
from tests.unit.quantizer_factory import make_quantizer


def _lsq_pair(weight_channels: int, axis: int) -> dict:
    return {
        "weight_quantizer": make_quantizer(
            "lsq", 3, True, "per_channel", "weight", channel_axis=axis, num_channels=weight_channels
        ),
        "input_quantizer": make_quantizer("lsq", 4, True),
    }


def test_qconv_transpose_matches_functional_and_passes_output_size(seed):
    module = QConvTranspose2d.from_float(nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1), **_lsq_pair(4, 1))
    x = torch.randn(2, 6, 5, 5)
    out = module(x, output_size=[10, 10])
    assert out.shape == (2, 4, 10, 10)
    qx, qw = module.input_quantizer(x), module.weight_quantizer(module.weight)
    expected = F.conv_transpose2d(qx, qw, module.bias, stride=2, padding=1, output_padding=1)
    assert torch.equal(out, expected)
    assert module.weight_quantizer.step.shape == (4,)


def test_qlinear_and_qconv_match_functional(seed):
    linear = QLinear.from_float(nn.Linear(7, 3), **_lsq_pair(3, 0))
    x = torch.randn(5, 7)
    assert torch.equal(
        linear(x), F.linear(linear.input_quantizer(x), linear.weight_quantizer(linear.weight), linear.bias)
    )
    conv = QConv2d.from_float(
        nn.Conv2d(3, 4, 3, padding=1),
        weight_quantizer=make_quantizer("dorefa", 2, True, role="weight"),
        input_quantizer=make_quantizer("dorefa", 2, False, clip=2.0),
    )
    x = torch.rand(1, 3, 6, 6)
    expected = F.conv2d(conv.input_quantizer(x), conv.weight_quantizer(conv.weight), conv.bias, padding=1)
    assert torch.equal(conv(x), expected)


def test_weight_substitution_is_restored_even_when_forward_raises():
    conv = QConv2d.from_float(nn.Conv2d(3, 4, 3), **_lsq_pair(4, 0))
    with pytest.raises(RuntimeError):
        conv(torch.randn(1, 5, 6, 6))  # wrong channel count
    assert isinstance(conv.weight, nn.Parameter)
    assert [name for name, _ in conv.named_parameters()][:2] == ["weight", "bias"]


def test_handler_lookup_follows_the_mro():
    class MyConv(nn.Conv2d):
        pass

    class MyAdd(Add):
        pass

    assert quantized_module_for(nn.Conv2d) is QConv2d
    assert quantized_module_for(MyConv) is QConv2d
    assert quantized_module_for(MyAdd) is QAdd
    assert quantized_module_for(nn.Conv1d) is None
    assert quantized_module_for(QConv2d) is None  # never convert twice
    dynamic = quantized_class(QConv2d, MyConv)
    assert (
        dynamic is quantized_class(QConv2d, MyConv)
        and issubclass(dynamic, MyConv)
        and dynamic.__name__ == "QConv2d[MyConv]"
    )
    with pytest.raises(TypeError, match="expects a Linear"):
        QLinear.from_float(nn.Conv2d(1, 1, 1), **_lsq_pair(1, 0))
    converted = QConv2d.from_float(MyConv(1, 1, 1), **_lsq_pair(1, 0))
    with pytest.raises(TypeError, match=r"QConv2d\[MyConv\] is already quantized"):
        QConv2d.from_float(converted, **_lsq_pair(1, 0))


def test_add_and_qadd_semantics(seed):
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(Add()(a, b), a + b)
    qadd = QAdd.from_float(
        Add(),
        output_quantizer=make_quantizer("lsq", 3, True, init_value=0.5),
        input_quantizer=make_quantizer("lsq", None),
    )
    assert not qadd.align_inputs
    assert torch.equal(qadd(a, b), torch.clamp(torch.round((a + b) / 0.5), -4, 3) * 0.5)


@pytest.mark.parametrize("signed, bits, offset", [(False, 4, False), (True, 2, False), (True, 8, True)])
def test_lsq_compact_codes_expand_bit_identically(signed: bool, bits: int, offset: bool) -> None:

    torch.manual_seed(bits)
    q = make_quantizer("lsq", bits, signed, role="activation", learnable_offset=offset)
    x = torch.randn(2, 3, 5, 5) * 3 if signed else torch.rand(2, 3, 5, 5) * 3
    if offset:
        q.offset.data.fill_(0.37)
    out = q(x)
    if offset:  # LSQ+'s float offset is not an integer zero point: no grid, so no codes
        assert q.compact(out.detach()) is None
        return
    codes, *_ = packed = q.compact(out.detach())
    assert codes.dtype == (torch.int8 if signed else torch.uint8)
    assert codes.element_size() * codes.numel() * 4 == out.element_size() * out.numel()
    assert torch.equal(q.expand(packed), out.detach())


def test_saved_quantized_input_is_compact_and_gradients_are_unchanged(monkeypatch) -> None:
    """QConv2d keeps its quantized input as int8 codes for backward; gradients stay bit-identical."""
    import contextlib

    import model_quantization.nn.base as nn_base
    from model_quantization import convert

    expanded = []
    original_expand = LSQQuantizer.expand

    def counting_expand(self, packed):
        expanded.append(packed[0].dtype)
        return original_expand(self, packed)

    monkeypatch.setattr(LSQQuantizer, "expand", counting_expand)

    def grads() -> list[torch.Tensor]:
        torch.manual_seed(0)
        spec = {"weight": {"bits": 4}, "activation": {"bits": 4, "signed": False}}
        model, _ = convert(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1)), spec)
        x = torch.rand(2, 4, 8, 8, requires_grad=True)
        model(x).square().sum().backward()
        return [x.grad] + [p.grad for p in model.parameters()]

    compact = grads()
    assert expanded == [torch.uint8], "the conv's saved input was not stored as codes"
    monkeypatch.setattr(nn_base, "_compact_saved_input", lambda quantizer, tensor: contextlib.nullcontext())
    plain = grads()
    assert len(expanded) == 1
    for a, b in zip(compact, plain, strict=True):
        assert torch.equal(a, b)


def test_dynamic_conv_quantizes_generated_weights_and_input() -> None:
    """CondInst-style call-time weights pass a weight quantizer (they would stay float with F.conv2d)."""
    from model_quantization import convert
    from model_quantization.nn import DynamicConv2d, QDynamicConv2d

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.controller = nn.Linear(3, 2 * 4 * 4)
            self.dynamic = DynamicConv2d()

        def forward(self, x, code):
            weight = self.controller(code).reshape(2 * 4, 4, 1, 1)  # 2 instances x 4 filters
            return self.dynamic(x, weight, None, groups=2)

    torch.manual_seed(0)
    model, report = convert(Head(), {"weight": {"bits": 2}, "activation": {"bits": 4, "signed": True}})
    assert isinstance(model.dynamic, QDynamicConv2d) and report["dynamic"].w_bits == "2"
    x, code = torch.randn(1, 8, 5, 5), torch.randn(3)
    out = model(x, code)
    weight = model.controller(code).reshape(8, 4, 1, 1)
    levels = torch.unique(
        model.dynamic.weight_quantizer(weight).detach() / model.dynamic.weight_quantizer.step
    )
    assert len(levels) <= 4, "2-bit generated weights take at most 4 levels"
    expected = F.conv2d(model.dynamic.input_quantizer(x), model.dynamic.weight_quantizer(weight), groups=2)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert model.controller.weight.grad is not None and model.dynamic.weight_quantizer.step.grad is not None
    with pytest.raises(ValueError, match="generated per call"):
        convert(Head(), {"weight": {"bits": 2, "granularity": "per_channel"}, "activation": {"bits": 4}})
