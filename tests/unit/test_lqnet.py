"""LQ-Net: nearest-level assignment, exact level counts (3 for ternary), least-squares basis update + EMA."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from tests.unit.quantizer_factory import make_quantizer


def brute_force_codes(bits: int, signed: bool, ternary: bool) -> torch.Tensor:
    """Code table written independently of the implementation (float64)."""
    if ternary:
        values = [(-2.0,), (0.0,), (2.0,)] if signed else [(0.0,), (1.0,), (2.0,)]
        return torch.tensor(values, dtype=torch.float64)
    return torch.tensor(
        list(itertools.product((-1.0, 1.0) if signed else (0.0, 1.0), repeat=bits)), dtype=torch.float64
    )


def reference_step(x_groups, basis, codes, momentum):
    """Float64: nearest level by brute force, LS basis with lstsq, EMA. x_groups: (G, M), basis: (G, K)."""
    out, new_basis = [], []
    for xg, v in zip(x_groups, basis, strict=True):
        levels = codes @ v  # (L,)
        index = (xg[:, None] - levels[None, :]).abs().argmin(dim=1)
        out.append(levels[index])
        b = codes[index]  # (M, K): the code of every element
        solution = torch.linalg.lstsq(b, xg[:, None], driver="gelsd").solution[:, 0]
        new_basis.append(momentum * v + (1 - momentum) * solution)
    return torch.stack(out), torch.stack(new_basis)


@pytest.mark.parametrize(
    "bits,signed,ternary",
    [(1, True, False), (2, True, False), (3, False, False), (2, True, True), (2, False, True)],
)
def test_training_step_matches_least_squares_reference(seed, bits, signed, ternary):
    rng = random.Random(seed)
    momentum = rng.uniform(0.0, 0.95)
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    if not signed:
        x = x.abs()
    q = make_quantizer("lqnet", bits, signed, momentum=momentum, ternary=ternary).double().train()
    q(x)  # initialisation batch (not an EMA step)
    basis_before = q.basis.clone()
    x2 = x * rng.uniform(0.5, 2.0) + 0.01 * torch.randn_like(x).abs()
    out = q(x2)
    codes = brute_force_codes(bits, signed, ternary)
    ref_out, ref_basis = reference_step(x2.reshape(1, -1), basis_before, codes, momentum)
    torch.testing.assert_close(out.reshape(1, -1), ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(q.basis, ref_basis, rtol=1e-8, atol=1e-10)


def test_per_channel_weights_have_one_basis_per_output_channel(seed):
    q = make_quantizer("lqnet", 2, True, "per_channel", "weight", num_channels=5, momentum=0.5).double()
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64) * torch.linspace(0.1, 2, 5, dtype=torch.float64).reshape(
        5, 1, 1, 1
    )
    q(w)
    basis_before = q.basis.clone()
    out = q(w)
    ref_out, ref_basis = reference_step(
        w.reshape(5, -1), basis_before, brute_force_codes(2, True, False), 0.5
    )
    torch.testing.assert_close(out.reshape(5, -1), ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(q.basis, ref_basis, rtol=1e-8, atol=1e-10)
    assert all(row.unique().numel() <= 4 for row in out.reshape(5, -1))


@pytest.mark.parametrize("signed", [True, False])
def test_ternary_has_exactly_three_levels(seed, signed):
    q = make_quantizer("lqnet", 2, signed, ternary=True)
    x = torch.randn(10000) * 2
    if not signed:
        x = x.abs()
    q(x)  # initialise and take one training step
    q.eval()  # in training the basis moves after each forward; compare against a fixed one
    out = q(x)
    levels = sorted(out.unique().tolist())
    assert len(levels) == 3
    v = q.basis.item()
    expected = [-2 * v, 0.0, 2 * v] if signed else [0.0, v, 2 * v]
    assert levels == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert q.bits_label == "ter"


@pytest.mark.parametrize("signed", [True, False])
def test_k_bit_has_exactly_2_pow_k_levels_on_spread_data(seed, signed):
    bits = random.Random(seed).randint(1, 4)
    q = make_quantizer("lqnet", bits, signed)
    x = torch.linspace(-4 if signed else 0, 4, 40000)
    assert q(x).unique().numel() == 2**bits


def test_eval_mode_does_not_update_the_basis_and_gradient_is_straight_through(seed):
    q = make_quantizer("lqnet", 3, True)
    q(torch.randn(100))
    q.eval()
    basis = q.basis.clone()
    x = torch.randn(100, requires_grad=True)
    q(x).sum().backward()
    assert torch.equal(q.basis, basis)
    assert torch.equal(x.grad, torch.ones_like(x))


def test_state_dict_round_trip_gives_identical_outputs(seed):
    q = make_quantizer("lqnet", 2, True, "per_channel", "weight", num_channels=3)
    w = torch.randn(3, 16)
    for _ in range(3):
        q(w)
    fresh = make_quantizer("lqnet", 2, True, "per_channel", "weight", num_channels=3)
    fresh.load_state_dict(q.state_dict())
    q.eval()
    fresh.eval()
    assert fresh.is_initialized
    assert torch.equal(fresh(w), q(w))
    assert "codes" not in q.state_dict()  # a constant of the configuration, not state


def test_ternary_needs_two_bits():
    with pytest.raises(ValueError, match="ternary: needs bits=2"):
        make_quantizer("lqnet", 3, True, ternary=True)
