"""Integer biases (``MODEL.QUANTIZATION.INTEGER_BIAS``) on the detector-shaped toy: the fake-quant model adds
each conv's bias rounded as ONNX Runtime's integer kernels add it, so the fused export computes exactly what
the model does; training still reaches every parameter; what has no integer grid is refused by name."""

from __future__ import annotations

import pytest
import torch

from model_quantization import convert
from model_quantization.deploy import (
    engine_divergence,
    engine_parity,
    export_network,
    make_session,
    reference_parity,
)
from model_quantization.deploy.grids import (
    SAFE_INT8_CODE,
    WIDE_CODE,
    grid_spread,
    integer_bias,
    spread_factors,
)
from model_quantization.deploy.integer_bias import attach_integer_bias
from model_quantization.deploy.lowering import DeployConv2d, lower
from model_quantization.deploy.parity import with_codes_as_outputs
from tests.unit.deploy_helpers import OUTPUTS, ToyDetector, images, initialised, toy_spec

#: Every quantized conv of the toy: three with their BN inside forward, the tower conv with a per-level BN
#: after it, and the prediction conv whose bias is its own (no norm).
CONVS = ["stem", "conv1", "conv2", "tower.0", "predict"]


def _toy(method: str = "lsq", bits: int = 2, seed: int = 2, integer: bool = True):
    """The toy as ``quantized_toy`` makes it (same seed, same batches), optionally with integer biases."""
    torch.manual_seed(seed)
    model, _ = convert(ToyDetector(), toy_spec(method, bits))
    attached = attach_integer_bias(model) if integer else []
    return initialised(model), attached


def test_the_fused_engine_computes_exactly_what_a_model_with_integer_biases_does():
    """The toy and seed whose fused engine misses gate 2 with float biases (cosine 0.96): with integer biases
    the engine equals the Q/DQ graph bit for bit and the graph still equals the fake-quant model (gate 1)."""
    plain, _ = _toy(integer=False)
    plain_export = export_network(plain, images(2), OUTPUTS, kernels="fused")
    inputs = [images(2, seed=7), images(2, seed=8)]
    assert engine_parity(plain_export.deploy, inputs).min_cosine < 0.99, "the premise: float biases drift"

    model, attached = _toy()
    assert attached == CONVS
    result = export_network(model, images(2), OUTPUTS, kernels="fused")
    assert result.lowering.integer_biases == CONVS
    engine = engine_parity(result.deploy, inputs)
    assert max(engine.max_abs_diff.values()) == 0.0, str(engine)
    reference = reference_parity(
        model, result.debug, OUTPUTS, result.lowering.activations, [images(2, seed=7)]
    )
    assert reference.passed, str(reference)
    assert max(reference.head_max_abs_diff_free.values()) < 1e-5, "free-running too: nothing to cascade"


def test_a_failed_engine_parity_names_where_the_integer_codes_part_ways():
    """Gate 2 on the float-bias toy fails; the report then names, by module, the first activation whose codes
    differ between the fused engine and the reference, and how far the difference spreads; with integer
    biases no code differs anywhere."""
    plain, _ = _toy(integer=False)
    exported = export_network(plain, images(2), OUTPUTS, kernels="fused")
    inputs = [images(2, seed=7), images(2, seed=8)]
    engine = engine_parity(exported.deploy, inputs)
    assert not engine.passed
    names = [d.quantizer for d in engine.divergence]
    assert names[:3] == ["stem.input", "conv1.input", "conv2.input"], names  # graph order, module names
    assert names.count("tower.0.input") == 2, "one entry per call of the shared tower (per level)"
    differing = [d for d in engine.divergence if d.differing]
    assert differing and all(0 < d.differing <= d.codes and d.max_steps >= 1 for d in differing)
    assert f"integer codes first differ at {differing[0].quantizer}" in str(engine)

    # making the codes graph outputs does not change what the fused engine computes at the heads
    deployed = make_session(exported.deploy, optimize=True, threads=1)
    feed = {deployed.get_inputs()[0].name: inputs[0].numpy()}
    heads = deployed.run(None, feed)
    extended = make_session(with_codes_as_outputs(exported.deploy), optimize=True, threads=1).run(None, feed)
    for head, again in zip(heads, extended, strict=False):
        assert torch.equal(torch.from_numpy(head), torch.from_numpy(again))

    model, _ = _toy()
    exact = export_network(model, images(2), OUTPUTS, kernels="fused")
    assert [d.differing for d in engine_divergence(exact.deploy, inputs)] == [0] * len(names)
    assert engine_parity(exact.deploy, inputs).divergence == [], "measured only when the gate fails"


def test_the_lowered_biases_are_on_the_kernel_grid_and_the_model_adds_the_same_rounding():
    model, _ = _toy()
    plain, _ = _toy(integer=False)
    lowered, summary, _ = lower(model)
    modules = dict(lowered.named_modules())
    for name in CONVS:
        conv = modules[name]
        assert isinstance(conv, DeployConv2d)
        source = dict(model.named_modules())[name]
        grid = source.weight_quantizer.integer_grid(source.weight)
        spread = grid_spread(grid.qmin, grid.qmax)
        for level in range(conv.levels):
            bias, scale = getattr(conv, f"bias_{level}"), getattr(conv, f"scale_{level}")
            units = bias / ((conv.input_qdq.scale * scale).abs() / spread)
            # integers up to float rounding (what ONNX Runtime's own rounding of the bias then keeps)
            assert (units - torch.round(units)).abs().max() < 1e-4, (
                f"{name} level {level}: off the int32 grid"
            )
    # Same weights and statistics, eval mode: only the rounded biases differ, and they do change outputs.
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours, theirs = model(images(2, seed=5)), plain(images(2, seed=5))
    assert any(not torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_the_rounding_is_at_most_half_a_kernel_unit_and_exact_on_the_grid():
    bias = torch.tensor([0.013, -0.4, 2.0, 0.0])
    input_scale, weight_scale = torch.tensor(0.05), torch.tensor([0.02, -0.02, 0.01, 0.3])
    snapped = integer_bias(bias, input_scale, weight_scale, spread=8)
    step = (input_scale * weight_scale).abs() / 8
    assert torch.all((snapped - bias).abs() <= step / 2 + 1e-9)
    assert torch.equal(integer_bias(snapped, input_scale, weight_scale, spread=8), snapped)
    # the export's spread of any channel on a 4-bit grid is at least the grid's, so the rounding stays exact
    assert grid_spread(-8, 7) == 8 and grid_spread(-2, 1) == 32 and grid_spread(-128, 127) == 1
    peaks = torch.arange(1, 9)
    assert torch.all(spread_factors(peaks, SAFE_INT8_CODE) >= grid_spread(-8, 7))
    assert torch.all(spread_factors(peaks, WIDE_CODE) >= grid_spread(-8, 7))


def test_training_reaches_every_parameter_and_leaves_them_in_place():
    model, _ = _toy()
    before = {name: id(p) for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    model.train()
    loss = sum(out.square().mean() for out in model(images(2, seed=3)))
    loss.backward()
    assert {name: id(p) for name, p in model.named_parameters()} == before, "the bias substitution is undone"
    assert list(model.state_dict()) == keys
    for name in ("predict.bias", "tower.0.bias", "conv1.weight", "tower.1.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # an exception inside the conv still puts its own bias back
    with pytest.raises(RuntimeError):
        model.predict(torch.zeros(1, 3, 8, 8))
    assert model.predict._parameters["bias"] is dict(model.named_parameters())["predict.bias"]


def test_a_conv_without_an_integer_grid_is_refused_by_name():
    with pytest.raises(ValueError, match=r"INTEGER_BIAS: 'conv1' has no integer grid: .*lqnet"):
        _toy("lqnet", 2)


def test_it_compiles_into_one_graph_that_computes_what_eager_does():
    """MODEL.QUANTIZATION.COMPILE with INTEGER_BIAS: the roundings trace (no graph break, no recompile per
    level or step) and the compiled training step computes the eager one's loss."""
    import copy

    from torch._dynamo.utils import counters

    model, _ = _toy(bits=4)
    model.train()
    eager = copy.deepcopy(model)
    counters.clear()
    compiled = torch.compile(model)
    for step in range(3):
        x = images(2, seed=step)
        losses = [sum(out.square().mean() for out in network(x)) for network in (compiled, eager)]
        for loss in losses:
            loss.backward()
        assert torch.allclose(losses[0], losses[1], rtol=1e-5), step
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
