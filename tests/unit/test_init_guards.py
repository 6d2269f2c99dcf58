"""Data-driven initialisation never stores non-finite or degenerate state (issue 13, items 1 and 2)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from model_quantization import convert
from tests.unit.quantizer_factory import make_quantizer

#: Every data-driven method, built so that its state comes from the first batch.
DATA_DRIVEN = [
    ("lsq", {}),
    ("lsq", {"init_method": "mse"}),
    ("lsq", {"init_method": "percentile"}),
    ("pact", {"init_value": None}),
    ("lqnet", {}),
    ("minmax", {}),
    ("ema_minmax", {}),
    ("percentile", {}),
]
IDS = [f"{m}-{o.get('init_method', '')}".rstrip("-") for m, o in DATA_DRIVEN]


def _quantizer(method: str, options: dict):
    q = make_quantizer(method, 4, None, **options)  # the method's first signedness (unsigned PACT)
    q.owner = "head.conv3 (input)"
    return q


def _state(q) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.state_dict().items()}


def _tiny_model():
    spec = {
        "weight": {"method": "lsq", "bits": 4},
        "activation": {"method": "lsq", "bits": 4, "signed": True},
    }
    model, _ = convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()), spec)
    return model


# ----------------------------------------------------------------------------------- item 1: NaN / Inf


def test_a_nan_in_the_initialising_batch_is_refused_and_the_next_clean_batch_initialises(seed):
    model = _tiny_model()
    poisoned = torch.randn(2, 3, 8, 8)
    poisoned[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"lsq quantizer in '0 \(input\)'.*non-finite.*nan"):
        model(poisoned)
    quantizer = model[0].input_quantizer
    assert not quantizer.is_initialized and bool(torch.isfinite(quantizer.step).all())
    # Nothing non-finite reached the state dict (what a checkpoint would save).
    for key, value in model.state_dict().items():
        assert bool(torch.isfinite(value.float()).all()), key
    clean = torch.randn(2, 3, 8, 8)
    out = model(clean)
    assert quantizer.is_initialized and bool(torch.isfinite(out).all())
    assert quantizer.step.item() == pytest.approx(2 * clean.abs().mean().item() / math.sqrt(7), rel=1e-6)


@pytest.mark.parametrize("method, options", DATA_DRIVEN, ids=IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_data_driven_method_refuses_a_non_finite_batch_naming_the_module(seed, method, options, bad):
    q = _quantizer(method, options)
    x = torch.rand(4, 3, 8, 8) + 0.1
    x[1, 2, 3, 4] = abs(bad) if not q.signed else bad
    before = _state(q)
    with pytest.raises(ValueError, match=r"head\.conv3 \(input\).*non-finite"):
        q(x)
    assert not q.is_initialized
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items()), "state changed"
    q(torch.rand(4, 3, 8, 8) + 0.1)
    assert q.is_initialized
    assert all(bool(torch.isfinite(v.float()).all()) for v in q.state_dict().values())


@pytest.mark.parametrize("method, options", DATA_DRIVEN, ids=IDS)
def test_finite_values_near_the_float32_limit_never_give_an_inf_state_silently(seed, method, options):
    q = _quantizer(method, options)
    x = torch.full((4, 3, 8, 8), 3e38)
    try:
        q(x)
    except ValueError as exc:
        assert "head.conv3 (input)" in str(exc) and "overflow" in str(exc)
        assert not q.is_initialized
    else:
        assert q.is_initialized
    assert all(bool(torch.isfinite(v.float()).all()) for v in q.state_dict().values())


def test_a_checkpoint_with_non_finite_quantizer_state_is_refused_naming_the_module():
    model = _tiny_model()
    model(torch.randn(2, 3, 8, 8))
    state = model.state_dict()
    state["0.input_quantizer.step"] = torch.tensor(float("nan"))
    fresh = _tiny_model()
    with pytest.raises(RuntimeError, match=r"0\.input_quantizer.*non-finite"):
        fresh.load_state_dict(state)
    assert not fresh[0].input_quantizer.is_initialized
    assert bool(torch.isfinite(fresh[0].input_quantizer.step).all())


# ----------------------------------------------------------------------------------- item 2: dead batches


def _fed(method: str, options: dict, *batches: torch.Tensor):
    q = _quantizer(method, options)
    for x in batches:
        q(x)
    return q


@pytest.mark.parametrize("method, options", DATA_DRIVEN, ids=IDS)
def test_an_all_zero_first_batch_defers_initialisation_to_the_next_batch_and_warns_by_name(
    seed, caplog, method, options
):
    data = torch.rand(4, 3, 8, 8) + 0.1
    with caplog.at_level(logging.WARNING, logger="model_quantization"):
        q = _fed(method, options, torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8))
    assert not q.is_initialized
    warnings = [r.getMessage() for r in caplog.records if "head.conv3 (input)" in r.getMessage()]
    assert len(warnings) == 1, "one warning per quantizer, not one per batch"
    assert "all zeros" in warnings[0] and "deferred" in warnings[0]
    q(data)
    assert q.is_initialized
    # Exactly the state a quantizer that never saw the dead batches gets from the same data.
    reference = _fed(method, options, data)
    for key, value in reference.state_dict().items():
        assert torch.equal(q.state_dict()[key], value), key


def test_a_dead_batch_between_init_batches_is_not_averaged_in(seed):
    batches = [torch.rand(2, 4, 6, 6) * (i + 1) for i in range(3)]
    q = make_quantizer("lsq", 3, False, init_batches=3)
    for x in (batches[0], torch.zeros(2, 4, 6, 6), batches[1], batches[2]):
        q(x)
    estimates = [2 * b.abs().mean() / math.sqrt(7) for b in batches]
    assert q.is_initialized
    torch.testing.assert_close(q.step.detach(), torch.stack(estimates).mean())


def test_a_dead_first_batch_no_longer_leaves_a_dead_quantizer(seed):
    model = _tiny_model()
    model(torch.zeros(2, 3, 8, 8))  # e.g. padding-only images
    x = torch.randn(2, 3, 8, 8)
    model(x)
    step = model[0].input_quantizer.step.item()
    assert step == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-6)


def test_dead_weight_channels_start_from_the_mean_step_of_the_live_ones_with_a_warning(seed, caplog):
    q = make_quantizer("lsq", 4, True, "per_channel", "weight", num_channels=6)
    q.owner = "head.cls_score (weight)"
    w = torch.randn(6, 4, 3, 3)
    w[[1, 4]] = 0.0
    with caplog.at_level(logging.WARNING, logger="model_quantization"):
        q(w)
    live = 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(7)
    expected = live.clone()
    expected[[1, 4]] = live[[0, 2, 3, 5]].mean()
    torch.testing.assert_close(q.step.detach(), expected)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "head.cls_score (weight)" in message and "[1, 4]" in message


@pytest.mark.parametrize("method, attribute", [("lsq", "step"), ("pact", "alpha")])
@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_a_non_positive_learned_step_is_clamped_in_the_forward_and_keeps_its_gradient(method, attribute, bad):
    q = make_quantizer(method, 4, False, init_value=0.5)
    x = torch.rand(2, 3, 8, 8) * 4
    getattr(q, attribute).data.fill_(bad)  # what an overshooting SGD step does
    out = q(x)
    assert bool(torch.isfinite(out).all()) and bool((out >= 0).all())
    # Every value lands on the tiny positive grid: nothing flips sign, nothing divides by zero.
    assert float(out.detach().abs().max()) < 1e-30
    out.sum().backward()
    grad = getattr(q, attribute).grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad) != 0.0
