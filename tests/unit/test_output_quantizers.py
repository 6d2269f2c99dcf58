"""Output quantizers (``MODEL.QUANTIZATION.OUTPUT_QUANTIZERS``) on the detector-shaped toy: the convs whose
outputs no quantizer takes (the stem feeding a float residual, the conv before the sum, the prediction conv)
get an 8-bit output quantizer, and then every conv exports as ONNX Runtime's int8-in, int8-out
``QLinearConv`` instead of ``ConvInteger`` + float rescale, computing exactly what the model does."""

from __future__ import annotations

import pytest
import torch

from model_quantization import QuantSpec, convert
from model_quantization.deploy import (
    ExportError,
    engine_parity,
    export_network,
    integer_coverage,
    reference_parity,
)
from model_quantization.deploy.integer_bias import attach_integer_bias
from model_quantization.deploy.lowering import lower
from model_quantization.nn.outputs import attach_output_quantizers
from tests.unit.deploy_helpers import OUTPUTS, ToyDetector, images, initialised, toy_spec

#: The toy's convs whose outputs are not quantized next (the stem's output also feeds the float residual).
UNFUSED = ["stem", "conv2", "predict"]


def _toy(outputs: list[str], *, integer: bool = True, seed: int = 2):
    torch.manual_seed(seed)
    spec = toy_spec("lsq", 4)
    model, _ = convert(ToyDetector(), spec)
    attached = attach_output_quantizers(
        model, outputs, spec.activation, rectified=lambda name, _: name == "stem"
    )
    if integer:
        attach_integer_bias(model)
    return initialised(model), attached


def test_every_conv_becomes_an_int8_out_kernel_that_computes_exactly_what_the_model_does():
    plain, _ = _toy([])
    assert plain.state_dict().keys().isdisjoint({"predict.output_quantizer.step"})
    plain_ops = integer_coverage(export_network(plain, images(2), OUTPUTS, kernels="fused").deploy).ops
    assert plain_ops.get("ConvInteger", 0) == 4, plain_ops  # the premise: 3 convs (predict twice) run unfused

    model, attached = _toy(UNFUSED)
    assert attached == UNFUSED
    result = export_network(model, images(2), OUTPUTS, kernels="fused")
    assert result.passes.convinteger == []
    assert integer_coverage(result.deploy).ops == {"QLinearConv": 7}
    inputs = [images(2, seed=7), images(2, seed=8)]
    engine = engine_parity(result.deploy, inputs)
    assert max(engine.max_abs_diff.values()) == 0.0, str(engine)
    reference = reference_parity(model, result.debug, OUTPUTS, result.lowering.activations, inputs[:1])
    assert reference.passed, str(reference)
    assert max(reference.head_max_abs_diff_free.values()) < 1e-5
    names = {spec.name for spec in result.lowering.activations}
    assert {f"{name}.output_quantizer" for name in UNFUSED} <= names


def test_the_outputs_are_on_an_8_bit_grid_and_the_quantizers_train_and_checkpoint():
    model, _ = _toy(UNFUSED, integer=False)
    stem, predict = model.stem.output_quantizer, model.predict.output_quantizer
    assert (stem.bits, stem.signed) == (8, False) and (predict.bits, predict.signed) == (8, True)
    with torch.no_grad():
        levels = model(images(2, seed=3))
    for out in levels:
        codes = out / predict.integer_grid().scale
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 128
    assert "conv2.output_quantizer.step" in model.state_dict()
    model.train()
    sum(out.square().mean() for out in model(images(2, seed=4))).backward()
    for name in UNFUSED:
        grad = getattr(model, name).output_quantizer.step.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match=r"'head\.\*' matches no quantized conv"):
        _toy(["stem", "head.*"])
    pact = QuantSpec.from_dict({"activation": {"method": "pact", "bits": 4}})
    model, _ = convert(ToyDetector(), pact)
    with pytest.raises(ValueError, match="OUTPUT_QUANTIZERS"):
        attach_output_quantizers(model, ["predict"], pact.activation, "OUTPUT_QUANTIZERS")
    # A norm that is a separate module acts after the output quantizer: it cannot fold into the conv.
    model, _ = _toy(["tower.0"], integer=False)
    with pytest.raises(ExportError, match=r"'tower\.0': its output quantizer acts before the separate norm"):
        lower(model)
