"""convert(): module swap on a torchvision-free toy CNN, the report, checkpoints, and spec errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_quantization import Add, QAdd, QConv2d, QConvTranspose2d, QLinear, convert
from model_quantization.convert import ConversionReport
from model_quantization.quantizers import LSQQuantizer
from tests.unit.deploy_helpers import NormConv2d


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = NormConv2d(
            channels, channels, 3, padding=1, bias=False, norm=nn.BatchNorm2d(channels), activation=nn.ReLU()
        )
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.add = Add()

    def forward(self, x):
        return torch.relu(self.add(self.conv2(self.conv1(x)), x))


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block(8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4, 5)
        self.temporal = nn.Conv1d(2, 2, 1)  # not supported: must be reported, not silently skipped

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.block(x)
        x = torch.relu(self.up(x))
        return self.head(x.mean(dim=(2, 3)))


SPEC = {
    "weight": {"method": "lsq", "bits": 4, "granularity": "per_channel"},
    "activation": {"method": "lsq", "bits": 4, "signed": False},
    "rules": [
        {"pattern": "stem", "weight": {"bits": 8}, "activation": {"bits": 8, "signed": True}},
        {"pattern": "block.add", "activation": {"signed": True}},
        {"pattern": "head", "weight": {"bits": 8, "granularity": "per_tensor"}, "activation": {"bits": 8}},
    ],
}


def _inputs():
    return torch.randn(2, 3, 8, 8)


def test_report_lists_every_module_with_method_bits_and_reasons():
    model, report = convert(ToyNet(), SPEC)
    assert isinstance(report, ConversionReport)
    rows = {r["name"]: r for r in report.rows()}
    assert rows["stem"] == {
        "status": "quantized",
        "name": "stem",
        "type": "Conv2d",
        "quantized_type": "QConv2d",
        "method": "lsq",
        "w_bits": "8",
        "a_bits": "8",
        "granularity": "per_channel",
        "rules": "stem",
    }
    assert (rows["block.conv1"]["type"], rows["block.conv1"]["quantized_type"]) == (
        "NormConv2d",
        "QConv2d[NormConv2d]",
    )
    assert (rows["block.conv2"]["w_bits"], rows["block.conv2"]["a_bits"], rows["block.conv2"]["rules"]) == (
        "4",
        "4",
        "",
    )
    assert (rows["block.add"]["w_bits"], rows["block.add"]["a_bits"], rows["block.add"]["granularity"]) == (
        "-",
        "4",
        "-",
    )
    assert rows["up"]["quantized_type"] == "QConvTranspose2d"
    assert (rows["head"]["w_bits"], rows["head"]["granularity"]) == ("8", "per_tensor")
    assert rows["block.conv1.norm"] == {
        "status": "float",
        "name": "block.conv1.norm",
        "type": "BatchNorm2d",
        "reason": "normalization layer (float by design)",
    }
    assert rows["temporal"]["reason"] == "unsupported type Conv1d"
    assert len(report.quantized) == 6 and len(report.left_float) == 2
    text = str(report)
    assert "Quantized modules (6)" in text and "Left in float (2)" in text
    assert all(name in text for name in rows)
    assert report["up"].method == "lsq"


def test_converted_modules_keep_identity_class_and_parameter_names():
    model = ToyNet()
    state = model.state_dict()
    params = dict(model.named_parameters())
    converted, _ = convert(model, SPEC, inplace=True)
    assert converted is model
    assert isinstance(model.stem, QConv2d) and isinstance(model.up, QConvTranspose2d)
    assert isinstance(model.head, QLinear) and isinstance(model.block.add, QAdd)
    assert isinstance(model.block.conv1, NormConv2d) and isinstance(model.block.conv1, QConv2d)
    assert isinstance(model.block.conv1.norm, nn.BatchNorm2d)
    assert model.block.conv1.float_class is NormConv2d and model.stem.float_class is nn.Conv2d
    assert set(model.block.add.quantizers()) == {"output_quantizer", "input_quantizer"}
    assert dict(model.named_parameters())["stem.weight"] is params["stem.weight"]
    float_keys = {k for k in model.state_dict() if "quantizer" not in k}
    assert float_keys == set(state)


def test_copy_conversion_leaves_the_original_untouched():
    model = ToyNet()
    converted, _ = convert(model, SPEC)
    assert converted is not model
    assert type(model.stem) is nn.Conv2d and type(model.block.conv1) is NormConv2d


def test_conv_subclass_still_applies_norm_and_activation_with_quantized_input_and_weight(seed):
    model, _ = convert(ToyNet(), SPEC)
    conv = model.block.conv1
    x = torch.randn(2, 8, 6, 6).abs()
    conv(x)  # a training forward initialises the quantizers (evaluation refuses uninitialised ones)
    conv.eval()
    out = conv(x)
    # The same computation written out by hand, with the module's own quantizers.
    expected = F.conv2d(conv.input_quantizer(x), conv.weight_quantizer(conv.weight), None, 1, 1)
    expected = torch.relu(conv.norm(expected))
    assert torch.equal(out, expected)
    assert conv.weight_quantizer.is_initialized and conv.input_quantizer.is_initialized
    assert isinstance(conv.weight, nn.Parameter)  # the substitution does not outlive the call


def test_training_step_reaches_weights_and_steps(seed):
    model, _ = convert(ToyNet(), SPEC)
    model(_inputs()).sum().backward()
    assert model.stem.weight.grad is not None and model.stem.weight_quantizer.step.grad is not None
    assert model.block.add.output_quantizer.step.grad is not None
    assert model.up.weight_quantizer.step.shape == (4,)  # per output channel: axis 1 of the weight


def test_float_checkpoint_loads_strictly_and_quantized_checkpoint_round_trips(seed):
    float_model = ToyNet()
    model, _ = convert(ToyNet(), SPEC)
    model.load_state_dict(float_model.state_dict(), strict=True)
    assert not model.stem.weight_quantizer.is_initialized  # initialised from data later (single-pass-init)
    x = _inputs()
    model(x)
    model.eval()
    reference = model(x)

    restored, _ = convert(ToyNet(), SPEC)
    restored.load_state_dict(model.state_dict(), strict=True)
    restored.eval()
    assert restored.stem.input_quantizer.is_initialized
    assert torch.equal(restored(x), reference)


def test_deepcopy_and_pickle_of_dynamic_subclasses(seed):
    model, _ = convert(ToyNet(), SPEC)
    x = _inputs()
    model(x)  # a training forward initialises the quantizers
    model.eval()
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.block.conv1) is type(model.block.conv1)
    assert torch.equal(loaded(x), expected)
    assert torch.equal(copy.deepcopy(model)(x), expected)


def test_rule_matching_no_module_is_an_error_with_close_names():
    spec = {**SPEC, "rules": [*SPEC["rules"], {"pattern": "block.conv3", "skip": True}]}
    model = ToyNet()
    with pytest.raises(
        ValueError,
        match=r"rules\[\d\] \('block\.conv3'\): matches no quantizable module \(closest module names: block\.conv[12]",
    ):
        convert(model, spec, inplace=True)
    assert type(model.stem) is nn.Conv2d  # nothing was converted


def test_rule_matching_only_non_quantizable_modules_is_an_error():
    with pytest.raises(ValueError, match=r"'block\.conv1\.norm'"):
        convert(ToyNet(), {"rules": [{"pattern": "block.conv1.norm", "skip": True}]})


def test_skip_rules_and_all_off_modules_are_reported_as_float():
    spec = {
        "activation": {"signed": True},
        "rules": [
            {"pattern": "block", "skip": True},
            {"pattern": "head", "weight": {"bits": "off"}, "activation": {"bits": "off"}},
        ],
    }
    model, report = convert(ToyNet(), spec)
    reasons = {r.name: r.reason for r in report.left_float}
    assert (
        reasons["block.conv1"] == reasons["block.conv2"] == reasons["block.add"] == "skipped by rule 'block'"
    )
    assert reasons["head"] == "all bits 'off' (rules: head)"
    assert type(model.head) is nn.Linear and type(model.block.conv2) is nn.Conv2d


def test_contradicting_rules_on_one_module_raise_before_converting():
    spec = {"rules": [{"pattern": "block", "skip": True}, {"pattern": "*.conv2", "weight": {"bits": 8}}]}
    model = ToyNet()
    with pytest.raises(
        ValueError, match=r"'block\.conv2' is matched by skip rule 'block' and by override rule '\*\.conv2'"
    ):
        convert(model, spec, inplace=True)
    assert type(model.stem) is nn.Conv2d


def test_converting_twice_is_an_error():
    model, _ = convert(ToyNet(), SPEC)
    with pytest.raises(ValueError, match="already contains quantized modules"):
        convert(model, SPEC)


def test_unsigned_default_on_signed_input_is_reported_at_first_batch():
    model, _ = convert(
        ToyNet(),
        {
            "activation": {"signed": False},
            "rules": [{"pattern": "block.add", "activation": {"signed": True}}],
        },
    )
    with pytest.raises(ValueError, match=r"'stem \(input\)' is unsigned but its input has negative values"):
        model(_inputs())


def test_attention_projection_is_reported_not_silently_converted():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.proj = nn.Linear(8, 8)

    model, report = convert(Attention(), {"activation": {"signed": True}})
    assert report["attn.out_proj"].reason.startswith("unsupported: its parent uses the weight directly")
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model.proj, QLinear)


def test_grouped_conv_transpose_rejects_per_channel_weights():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)

    with pytest.raises(ValueError, match=r"'up': per_channel weights of a grouped ConvTranspose2d"):
        convert(Up(), {"weight": {"granularity": "per_channel"}})


def test_align_add_inputs_shares_one_quantizer_for_both_summands(seed):
    model, report = convert(ToyNet(), {**SPEC, "align_add_inputs": True})
    add = model.block.add
    assert add.align_inputs and isinstance(add.input_quantizer, LSQQuantizer)
    a, b = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    add.eval()
    add.input_quantizer.step.data.fill_(0.25)
    add.input_quantizer.initialized.fill_(True)
    add.output_quantizer.step.data.fill_(0.5)
    add.output_quantizer.initialized.fill_(True)
    out = add(a, b)
    expected_in = [torch.clamp(torch.round(t / 0.25), -8, 7) * 0.25 for t in (a, b)]
    expected = torch.clamp(torch.round((expected_in[0] + expected_in[1]) / 0.5), -8, 7) * 0.5
    assert torch.equal(out, expected)


def test_sums_convert_with_an_unsigned_only_activation_method():
    """PACT (unsigned activations only) on a model with Add: the unaligned input quantizer must stay unsigned."""

    class SumNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.add = Add()

        def forward(self, x):
            y = F.relu(self.conv(x))
            return self.add(y, y)

    model, report = convert(
        SumNet(), {"weight": {"bits": 4}, "activation": {"method": "pact", "bits": 4, "signed": False}}
    )
    assert isinstance(model.add, QAdd) and not model.add.align_inputs
    assert report["add"].method == "pact"
    out = model(torch.rand(1, 2, 4, 4))
    assert out.min() >= 0 and torch.isfinite(out).all()
