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
from model_quantization.deploy.lowering import following_norms, lower
from model_quantization.nn.outputs import attach_output_quantizers
from model_quantization.quantizers.estimators import mse_step
from tests.unit.deploy_helpers import OUTPUTS, ToyDetector, images, initialised, toy_spec

#: The toy's convs whose outputs are not quantized next (the stem's output also feeds the float residual).
UNFUSED = ["stem", "conv2", "predict"]


def _toy(outputs: list[str], *, integer: bool = True, seed: int = 2, after_norms: bool = True):
    """The toy with output quantizers on ``outputs``: after the tower's separate norm (as modeling places
    them) or, with ``after_norms=False``, on every conv's own output."""
    torch.manual_seed(seed)
    spec = toy_spec("lsq", 4)
    model, _ = convert(ToyDetector(), spec)
    separate = following_norms(model) if after_norms else {}
    attached = attach_output_quantizers(
        model,
        outputs,
        spec.activation,
        rectified=lambda name, _: name == "stem",
        placement=lambda name, conv: separate.get(name, conv),
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


def test_output_steps_start_at_the_least_squares_step_not_at_lsqs_8_bit_mean_abs_estimate():
    """LSQ's ``2 mean|x| / sqrt(Qp)`` at 8 bits spreads the grid over ~22 mean|x| (a trained FCOS's logit step
    was 0.74); output quantizers start from the step of least squared error on their first batch instead,
    whatever the activation recipe's own ``init_method``."""
    torch.manual_seed(2)
    spec = toy_spec("lsq", 4)
    model, _ = convert(ToyDetector(), spec)
    attach_output_quantizers(model, UNFUSED, spec.activation)
    assert spec.activation.options.get("init_method", "mean_abs") == "mean_abs"
    seen = {}
    for name in UNFUSED:
        quantizer = getattr(model, name).output_quantizer
        quantizer.register_forward_pre_hook(
            lambda q, args, name=name: seen.setdefault(name, args[0].detach())
        )
    with torch.no_grad():
        model.train()(images(4, seed=100))
    for name in UNFUSED:
        quantizer, x = getattr(model, name).output_quantizer, seen[name]
        least_squares = mse_step(x, quantizer.qn, quantizer.qp)
        torch.testing.assert_close(quantizer.step.detach().reshape(()), least_squares.reshape(()))
        mean_abs = 2 * x.abs().mean() / quantizer.qp**0.5

        def error(step, x=x, q=quantizer):
            return (torch.clamp(torch.round(x / step), -q.qn, q.qp) * step - x).square().mean()

        assert error(least_squares) < error(mean_abs), name


def test_a_conv_with_a_separate_norm_quantizes_after_that_norm_which_still_folds():
    """The shared tower: conv, then its per-level BN as the next module. The output quantizer takes the norm's
    output (with the integer-bias rounding added first), and the export folds the norm as without it."""
    model, _ = _toy(["tower.0"])
    result = export_network(model, images(2), OUTPUTS, kernels="fused")
    assert result.lowering.output_quantizers == ["tower.0"]
    assert any(line.startswith("tower.0 <- LevelBN") for line in result.lowering.folded_norms)
    inputs = [images(2, seed=7)]
    reference = reference_parity(model, result.debug, OUTPUTS, result.lowering.activations, inputs)
    assert reference.passed, str(reference)
    assert engine_parity(result.deploy, inputs).min_cosine > 0.999
    with torch.no_grad():  # the tower's output is on the output quantizer's grid before its ReLU
        tower = model.tower[1](model.tower[0](model.stem((images(1) - 110.0) / 60.0)))
    codes = tower / model.tower[0].output_quantizer.integer_grid().scale
    assert torch.allclose(codes, codes.round(), atol=1e-3)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match=r"'head\.\*' matches no quantized conv"):
        _toy(["stem", "head.*"])
    pact = QuantSpec.from_dict({"activation": {"method": "pact", "bits": 4}})
    model, _ = convert(ToyDetector(), pact)
    with pytest.raises(ValueError, match="OUTPUT_QUANTIZERS"):
        attach_output_quantizers(model, ["predict"], pact.activation, "OUTPUT_QUANTIZERS")
    # On the conv's own output, before the norm that folds into it: the export cannot write that.
    model, _ = _toy(["tower.0"], integer=False, after_norms=False)
    with pytest.raises(
        ExportError, match=r"'tower\.0': its output quantizer acts on the conv's output, before"
    ):
        lower(model)
