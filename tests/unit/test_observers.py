"""PTQ observers: range statistics against float64 references, calibration mode, state round trip."""

from __future__ import annotations

import math
import random

import pytest
import torch

from model_quantization.quantizers import (
    calibration,
)
from tests.unit.quantizer_factory import make_quantizer


def batches(n: int) -> list[torch.Tensor]:
    return [torch.randn(4, 3, 8, 8, dtype=torch.float64) * (i + 1) + i for i in range(n)]


def test_minmax_tracks_global_range_and_quantizes_on_its_grid(seed):
    bits = random.Random(seed).randint(2, 8)
    q = make_quantizer("minmax", bits, True).double()
    data = batches(3)
    with calibration(q):
        for x in data:
            q(x)
    low = min(x.min().item() for x in data)
    high = max(x.max().item() for x in data)
    assert q.min_val.item() == low and q.max_val.item() == high
    step = max(abs(low), abs(high)) / (2 ** (bits - 1) - 1)
    out = q(data[0])
    units = out / step
    torch.testing.assert_close(units, units.round(), rtol=0, atol=1e-9)
    assert units.min() >= -(2 ** (bits - 1)) and units.max() <= 2 ** (bits - 1) - 1


def test_ranges_freeze_outside_calibration(seed):
    q = make_quantizer("minmax", 8, True)
    q(torch.randn(100))  # first batch initialises even outside calibration
    frozen = (q.min_val.clone(), q.max_val.clone())
    q(torch.randn(100) * 50)
    assert torch.equal(q.min_val, frozen[0]) and torch.equal(q.max_val, frozen[1])
    with calibration(q) as observers:
        assert observers == [q] and q.calibrating
        q(torch.randn(100) * 50)
    assert not q.calibrating
    assert q.max_val > frozen[1]


def test_moving_average_formula(seed):
    momentum = random.Random(seed).uniform(0.01, 0.9)
    q = make_quantizer("ema_minmax", 8, True, momentum=momentum).double()
    data = batches(4)
    low, high = data[0].min(), data[0].max()
    for x in data[1:]:
        low = (1 - momentum) * low + momentum * x.min()
        high = (1 - momentum) * high + momentum * x.max()
    with calibration(q):
        for x in data:
            q(x)
    torch.testing.assert_close(q.min_val, low.float().double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.max_val, high.float().double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_percentile_is_the_mean_of_nearest_rank_percentiles(seed, granularity):
    percentile = random.Random(seed).uniform(90.0, 99.9)
    q = make_quantizer("percentile", 8, True, granularity, "weight", num_channels=4, percentile=percentile)
    data = [torch.randn(4, 50) * (i + 1) for i in range(3)]
    with calibration(q):
        for x in data:
            q(x)

    def nearest_rank(values: list[float], p: float) -> float:
        ordered = sorted(values)
        return ordered[min(max(math.ceil(p / 100 * len(ordered)), 1), len(ordered)) - 1]

    groups = (
        (lambda x: [row.tolist() for row in x])
        if granularity == "per_channel"
        else (lambda x: [x.flatten().tolist()])
    )
    highs = [[nearest_rank(g, percentile) for g in groups(x)] for x in data]
    lows = [[nearest_rank(g, 100 - percentile) for g in groups(x)] for x in data]
    expected_high = torch.tensor(highs).mean(dim=0)
    expected_low = torch.tensor(lows).mean(dim=0)
    torch.testing.assert_close(q.max_val.reshape(-1), expected_high, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.min_val.reshape(-1), expected_low, rtol=1e-6, atol=1e-6)


def test_unsigned_observer_step_and_negative_input_check():
    q = make_quantizer("minmax", 4, False)
    q(torch.tensor([0.0, 1.5, 3.0]))
    assert q.step().item() == pytest.approx(3.0 / 15)
    with pytest.raises(ValueError, match="unsigned"):
        make_quantizer("minmax", 4, False)(torch.tensor([-0.5, 1.0]))


def test_observer_state_dict_round_trip(seed):
    q = make_quantizer("percentile", 6, True, percentile=99.0)
    with calibration(q):
        for x in batches(2):
            q(x.float())
    fresh = make_quantizer("percentile", 6, True, percentile=99.0)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(2, 3, 4, 4) * 3
    assert fresh.is_initialized
    assert torch.equal(fresh(x), q(x))


def test_mse_observer_steps_are_the_mean_of_each_batch_mse_optimal_step(seed):
    from model_quantization.quantizers import calibration
    from model_quantization.quantizers.estimators import mse_step

    q = make_quantizer("mse", 4, False)
    batches = [torch.rand(2, 3, 8, 8) ** 3 * (i + 1) for i in range(3)]
    with calibration(q):
        for x in batches:
            q(x)
    expected = torch.stack([mse_step(x, 0, 15) for x in batches]).mean()
    torch.testing.assert_close(q.integer_grid().scale, expected)
    w = torch.randn(5, 4, 3, 3)
    per_channel = make_quantizer("mse", 3, True, "per_channel", "weight", num_channels=5)
    per_channel(w)
    torch.testing.assert_close(per_channel.integer_grid().scale, mse_step(w, 4, 3, axis=0))
