"""WeightedAdd (BiFPN's normalised fusion as a module) and its quantized form, QWeightedAdd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_quantization import convert
from model_quantization.nn import QuantizedSumModule, QWeightedAdd, WeightedAdd, quantized_module_for
from tests.unit.quantizer_factory import make_quantizer


def _inline_fusion(inputs: list[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """AdelaiDet's SingleBiFPN.forward at the pin, verbatim."""
    weights = F.relu(weight)
    norm_weights = weights / (weights.sum() + 0.0001)
    new_node = torch.stack(inputs, dim=-1)
    return (norm_weights * new_node).sum(dim=-1)


class Node(nn.Module):
    """One BiFPN node as the patched SingleBiFPN builds it: the weights are the parent's parameter."""

    def __init__(self, num_inputs: int = 3, channels: int = 4) -> None:
        super().__init__()
        self.weights_f1_1_3_4 = nn.Parameter(torch.ones(num_inputs))
        self.fusion_f1_1_3_4 = WeightedAdd(eps=0.0001)
        self.outputs_f1_1_3_4 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        fused = self.fusion_f1_1_3_4(inputs, self.weights_f1_1_3_4)
        return self.outputs_f1_1_3_4(F.relu(fused))


def _inputs(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(2, 4, 6, 6) * (i + 1) for i in range(n)]


def test_weighted_add_is_bit_identical_to_the_inline_fusion(seed):
    inputs, weight = _inputs(), torch.randn(3)
    assert torch.equal(WeightedAdd(eps=0.0001)(inputs, weight), _inline_fusion(inputs, weight))
    assert torch.equal(WeightedAdd()(tuple(inputs), weight), _inline_fusion(inputs, weight))  # any sequence
    assert list(WeightedAdd().state_dict()) == []
    assert quantized_module_for(WeightedAdd) is QWeightedAdd and issubclass(QWeightedAdd, QuantizedSumModule)


@pytest.mark.parametrize("align", [False, True])
def test_qweighted_add_matches_float_at_high_bits_and_exactly_when_off(seed, align):
    inputs, weight = _inputs(), torch.rand(3) + 0.1
    reference = _inline_fusion(inputs, weight)
    off = QWeightedAdd.from_float(
        WeightedAdd(),
        output_quantizer=make_quantizer("lsq", None),
        input_quantizer=make_quantizer("lsq", None),
    )
    assert torch.equal(off(inputs, weight), reference) and not off.align_inputs
    # 8 bits, steps covering the data range (max |x| / 127): within half a step of each quantizer
    out_step = reference.abs().max().item() / 127
    in_step = max(x.abs().max().item() for x in inputs) / 127
    fusion = QWeightedAdd.from_float(
        WeightedAdd(),
        output_quantizer=make_quantizer("lsq", 8, True, init_value=out_step),
        input_quantizer=make_quantizer("lsq", 8 if align else None, True, init_value=in_step),
    )
    assert fusion.align_inputs is align
    error = (fusion(inputs, weight) - reference).abs().max().item()
    assert error <= 0.5 * out_step + (0.5 * in_step if align else 0.0) + 1e-6


def test_qweighted_add_applies_its_quantizers_in_order(seed):
    inputs, weight = _inputs(2), torch.tensor([0.7, 1.9])
    fusion = QWeightedAdd.from_float(
        WeightedAdd(),
        output_quantizer=make_quantizer("lsq", 3, True, init_value=0.5),
        input_quantizer=make_quantizer("lsq", 4, True, init_value=0.25),
    )
    grid = [torch.clamp(torch.round(x / 0.25), -8, 7) * 0.25 for x in inputs]
    expected = torch.clamp(torch.round(_inline_fusion(grid, weight) / 0.5), -4, 3) * 0.5
    assert torch.equal(fusion(inputs, weight), expected)


def test_gradients_reach_the_fusion_weight_inputs_and_steps(seed):
    model, report = convert(Node(), {"weight": {"bits": 4}, "activation": {"bits": 4, "signed": True}})
    assert isinstance(model.fusion_f1_1_3_4, QWeightedAdd)
    row = report["fusion_f1_1_3_4"]
    assert (row.type, row.w_bits, row.a_bits) == ("WeightedAdd", "-", "4")
    inputs = [x.requires_grad_() for x in _inputs()]
    model(inputs).square().sum().backward()
    grad = model.weights_f1_1_3_4.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in inputs)
    assert model.fusion_f1_1_3_4.output_quantizer.step.grad is not None


def test_state_dict_keys_are_unchanged_and_float_checkpoints_load_strictly(seed):
    float_node = Node()
    float_keys = set(float_node.state_dict())
    assert float_keys == {"weights_f1_1_3_4", "outputs_f1_1_3_4.weight", "outputs_f1_1_3_4.bias"}
    spec = {"weight": {"bits": 4}, "activation": {"bits": 4, "signed": True}, "align_add_inputs": True}
    model, _ = convert(Node(), spec)
    keys = set(model.state_dict())
    assert float_keys <= keys
    assert all("quantizer" in k for k in keys - float_keys)
    model.load_state_dict(float_node.state_dict(), strict=True)
    assert torch.equal(model.weights_f1_1_3_4, float_node.weights_f1_1_3_4)
    x = _inputs()
    model(x)
    model.eval()
    restored, _ = convert(Node(), spec)
    restored.load_state_dict(model.state_dict(), strict=True)
    restored.eval()
    assert torch.equal(restored(x), model(x))


def test_fusions_with_bits_off_stay_float_with_a_reason():
    spec = {"rules": [{"pattern": "fusion_*", "activation": {"bits": "off"}}]}
    model, report = convert(Node(), spec)
    assert type(model.fusion_f1_1_3_4) is WeightedAdd
    assert report["fusion_f1_1_3_4"].reason.startswith("all bits 'off'")
