"""``calibrating`` mode: every quantizer folds every batch into its data-driven state while it is on."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model_quantization import convert
from model_quantization.quantizers import QUANTIZERS, Quantizer, calibration
from tests.unit.quantizer_factory import make_quantizer

SPEC = {
    "weight": {"method": "lsq", "bits": 4, "options": {"init_batches": 2}},
    "activation": {"method": "lsq", "bits": 4, "signed": True},
}


def _model():
    return convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), SPEC)[0]


def _batches(n: int) -> list[torch.Tensor]:
    return [torch.randn(2, 3, 10, 10) * (i + 1) for i in range(n)]


@pytest.mark.parametrize("method", QUANTIZERS.names())
def test_the_context_switches_every_enabled_quantizer_on_and_restores_it(method):
    q = make_quantizer(method, 1 if method == "binary" else 4)
    off = make_quantizer(method, None)
    model = nn.Sequential(q, off)
    assert not q.calibrating
    with calibration(model) as switched:
        assert switched == [q] and q.calibrating and not off.calibrating
        assert "calibrating=True" in repr(q)
    assert not q.calibrating and "calibrating" not in repr(q)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("init_batches", [1, 2, 5])
def test_lsq_step_is_the_running_mean_of_every_calibration_batch_then_frozen(seed, mode, init_batches):
    q = make_quantizer("lsq", 4, True, init_batches=init_batches)
    q.train(mode == "train")
    batches = [torch.randn(4, 16) * (i + 1) for i in range(4)]
    with calibration(q):
        for x in batches:
            q(x)
    expected = torch.stack([2 * x.abs().mean() / math.sqrt(7) for x in batches]).mean()
    torch.testing.assert_close(q.step.detach(), expected)
    assert q.is_initialized and int(q.init_batches_seen) == 4
    q(torch.randn(4, 16) * 100)  # frozen after the context, whatever init_batches says
    torch.testing.assert_close(q.step.detach(), expected)


def test_calibration_continues_the_stored_state_unless_reset(seed):
    first, second = torch.randn(64), torch.randn(64) * 3
    estimate = [2 * x.abs().mean() / math.sqrt(7) for x in (first, second)]
    q = make_quantizer("lsq", 4, True)
    q(first)
    with calibration(q):
        q(second)
    torch.testing.assert_close(q.step.detach(), (estimate[0] + estimate[1]) / 2)
    with calibration(q, reset=True):
        q(second)
    torch.testing.assert_close(q.step.detach(), estimate[1])


def test_pact_alpha_is_the_mean_of_the_batch_maxima_even_with_an_init_value(seed):
    q = make_quantizer("pact", 4)  # init_value 10.0: initialised, yet calibration estimates from data
    batches = [torch.rand(3, 20) * (i + 2) for i in range(3)]
    with calibration(q):
        for x in batches:
            q(x)
    torch.testing.assert_close(q.alpha.detach(), torch.stack([x.max() for x in batches]).mean())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_lqnet_basis_is_the_mean_of_the_per_batch_fits_without_the_training_ema(seed, mode):
    q = make_quantizer("lqnet", 2, True)
    q.train(mode == "train")
    batches = [torch.randn(4, 32) * (i + 1) for i in range(3)]
    fits = [q._initial_values(x)["basis"] for x in batches]
    with calibration(q):
        for x in batches:
            q(x)
    torch.testing.assert_close(q.basis, torch.stack(fits).mean(dim=0))


def test_observers_observe_every_batch_only_inside_the_context(seed):
    q = make_quantizer("minmax", 8, True)
    q(torch.randn(100))
    frozen = q.max_val.clone()
    q(torch.randn(100) * 50)
    assert torch.equal(q.max_val, frozen)
    with calibration(q):
        q(torch.randn(100) * 50)
    assert q.max_val > frozen


def test_a_whole_model_calibrates_in_eval_mode_from_scratch_and_is_then_frozen(seed):
    model = _model().eval()
    batches = _batches(3)
    with calibration(model) as quantizers:
        for x in batches:
            model(x)
    assert len(quantizers) == 4 and all(isinstance(q, Quantizer) for q in quantizers)
    assert all(q.is_initialized and int(q.init_batches_seen) == 3 for q in quantizers)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(2, 3, 10, 10) * 7)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    expected = torch.stack([2 * x.abs().mean() / math.sqrt(7) for x in batches]).mean()
    torch.testing.assert_close(model[0].input_quantizer.step.detach(), expected)
