"""PACT, DoReFa and binary quantizers against float64 formulas from their papers."""

from __future__ import annotations

import random

import pytest
import torch

from tests.unit.quantizer_factory import make_quantizer


def assert_uniform_quantized(out: torch.Tensor, x: torch.Tensor, clip: float, levels: int) -> None:
    """out == round(clamp(x, 0, clip) * levels / clip) * clip / levels, in float64.

    The grid points of a linspace can land exactly on a rounding tie, where float rounding of the two
    formulations legitimately picks either neighbour: those elements only have to be one of the two.
    """
    units = x.detach().clamp(0, clip) * levels / clip
    tie = ((units - units.floor()) - 0.5).abs() < 1e-9
    expected = torch.floor(units + 0.5) * clip / levels
    torch.testing.assert_close(out.detach()[~tie], expected[~tie], rtol=0, atol=1e-12)
    got = out.detach()[tie] * levels / clip
    assert torch.all(((got - units[tie].floor()).abs() < 1e-6) | ((got - units[tie].ceil()).abs() < 1e-6))


# --------------------------------------------------------------------------------------------------- PACT


def test_pact_output_levels_and_gradients_match_the_paper(seed):
    rng = random.Random(seed)
    bits = rng.randint(1, 8)
    alpha = rng.uniform(0.5, 5.0)
    q = make_quantizer("pact", bits, init_value=alpha).double()
    alpha = q.alpha.item()
    n = 2**bits - 1
    x = torch.cat([torch.linspace(0, 1.5 * alpha, 40 * (n + 1)), torch.rand(300) * 2 * alpha]).double()
    x = x.requires_grad_(True)
    grad = torch.randn_like(x)
    out = q(x)
    out.backward(grad)

    assert_uniform_quantized(out, x, alpha, n)
    assert out.unique().numel() == 2**bits
    torch.testing.assert_close(x.grad, grad * ((x.detach() >= 0) & (x.detach() < alpha)), rtol=0, atol=0)
    torch.testing.assert_close(q.alpha.grad, (grad * (x.detach() >= alpha)).sum(), rtol=1e-12, atol=1e-12)


def test_pact_sgd_updates_alpha_by_the_clipped_gradient(seed):
    q = make_quantizer("pact", 4, init_value=2.0)
    x = torch.rand(4, 8, 5, 5) * 4
    grad = torch.randn_like(x)
    q(x).backward(grad)
    optimizer = torch.optim.SGD(q.parameters(), lr=0.01)
    expected = 2.0 - 0.01 * (grad * (x >= 2.0)).sum()
    optimizer.step()
    torch.testing.assert_close(q.alpha.detach(), expected)


def test_pact_data_driven_init_uses_the_batch_maximum(seed):
    q = make_quantizer("pact", 3, init_value=None)
    x = torch.rand(2, 3, 4) * 7
    assert not q.is_initialized
    q(x)
    assert q.alpha.item() == pytest.approx(x.max().item())
    assert q.is_initialized


def test_pact_is_unsigned_activation_only():
    with pytest.raises(ValueError, match="must be unsigned"):
        make_quantizer("pact", 4, signed=True)
    with pytest.raises(ValueError, match="cannot quantize weights"):
        make_quantizer("pact", 4, role="weight")


# --------------------------------------------------------------------------------------------------- DoReFa


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_dorefa_weights_match_formula_levels_and_ste_gradient(seed, granularity):
    rng = random.Random(seed)
    bits = rng.randint(2, 8)
    channels = rng.randint(2, 6)
    q = make_quantizer("dorefa", bits, True, granularity, "weight", num_channels=channels)
    w = (torch.randn(channels, 3, 3, 3, dtype=torch.float64) * rng.uniform(0.1, 2)).requires_grad_(True)
    out = q(w)
    grad = torch.randn_like(w)
    out.backward(grad)

    def transform(t, rounding):
        tanh = torch.tanh(t)
        peak = (
            tanh.abs().max() if granularity == "per_tensor" else tanh.abs().amax(dim=(1, 2, 3), keepdim=True)
        )
        unit = tanh / (2 * peak) + 0.5
        levels = 2**bits - 1
        return 2 * rounding(unit * levels) / levels - 1

    expected = transform(w.detach(), lambda t: torch.floor(t + 0.5))
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-12)
    assert out.abs().max() <= 1 + 1e-12
    # Straight-through: the gradient is that of the unrounded transform (independent autograd in float64).
    w_ref = w.detach().clone().requires_grad_(True)
    transform(w_ref, lambda t: t).backward(grad)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-10, atol=1e-12)


def test_dorefa_weight_levels_span_2_pow_bits(seed):
    bits = random.Random(seed).randint(1, 8)
    q = make_quantizer("dorefa", bits, True, role="weight")
    w = torch.linspace(-3, 3, 20000).reshape(100, 200)
    assert q(w).unique().numel() == 2**bits


def test_dorefa_one_bit_weights_are_sign_times_mean_abs(seed):
    q = make_quantizer("dorefa", 1, True, "per_channel", "weight", num_channels=4)
    w = torch.randn(4, 10)
    expected = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(q(w), expected)


def test_dorefa_activations_clip_and_quantize(seed):
    rng = random.Random(seed)
    bits, clip = rng.randint(1, 8), rng.uniform(0.5, 3.0)
    q = make_quantizer("dorefa", bits, False, role="activation", clip=clip)
    x = torch.cat([torch.linspace(0, 2 * clip, 20 * 2**bits), torch.rand(100)]).double().requires_grad_(True)
    out = q(x)
    out.backward(torch.ones_like(x))
    assert_uniform_quantized(out, x, clip, 2**bits - 1)
    assert out.unique().numel() == 2**bits
    assert torch.equal(x.grad, ((x.detach() >= 0) & (x.detach() < clip)).double())


def test_dorefa_rejects_signed_activations_and_unknown_options():
    with pytest.raises(ValueError, match="must be unsigned"):
        make_quantizer("dorefa", 4, True, role="activation")
    with pytest.raises(ValueError, match=r"unknown option 'clp'.*'clip'"):
        make_quantizer("dorefa", 4, False, role="activation", clp=2.0)


# --------------------------------------------------------------------------------------------------- binary


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_xnor_weights_and_gradient_match_the_paper(seed, granularity):
    channels = random.Random(seed).randint(2, 8)
    q = make_quantizer("binary", 1, True, granularity, "weight", num_channels=channels)
    w = (torch.randn(channels, 5, dtype=torch.float64) * 0.8).requires_grad_(True)
    out = q(w)
    grad = torch.randn_like(w)
    out.backward(grad)

    dims = (1,) if granularity == "per_channel" else (0, 1)
    alpha = w.detach().abs().mean(dim=dims, keepdim=True)
    sign = torch.where(w.detach() >= 0, 1.0, -1.0).double()
    torch.testing.assert_close(out.detach(), sign * alpha, rtol=0, atol=1e-15)
    n = w[0].numel() if granularity == "per_channel" else w.numel()
    # d/dw_i [sign(w_i) * mean_j |w_j|] = alpha * 1[|w_i| <= 1] + sign(w_i) / n * sum_j g_j sign(w_j) / g_i
    expected = grad * alpha * (w.detach().abs() <= 1) + sign / n * (grad * sign).sum(dim=dims, keepdim=True)
    torch.testing.assert_close(w.grad, expected, rtol=1e-12, atol=1e-12)
    per_group = (
        out.detach().reshape(channels, -1) if granularity == "per_channel" else out.detach().reshape(1, -1)
    )
    assert all(row.unique().numel() <= 2 for row in per_group)


@pytest.mark.parametrize("backward", ["bireal", "ste"])
def test_binary_activation_gradients(seed, backward):
    q = make_quantizer("binary", 1, True, backward=backward)
    x = torch.cat([torch.randn(500, dtype=torch.float64) * 1.5, torch.zeros(3, dtype=torch.float64)])
    x.requires_grad_(True)
    grad = torch.randn_like(x)
    out = q(x)
    out.backward(grad)
    assert set(out.detach().unique().tolist()) == {-1.0, 1.0}  # sign(0) = +1: exactly two levels
    xd = x.detach()
    if backward == "bireal":
        expected = grad * torch.where(xd.abs() < 1, 2 - 2 * xd.abs(), torch.zeros_like(xd))
    else:
        expected = grad * (xd.abs() <= 1)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-15)


def test_binary_only_supports_one_bit():
    with pytest.raises(ValueError, match=r"bits: binary supports bits in \[1, 1\]"):
        make_quantizer("binary", 2, True)
    with pytest.raises(ValueError, match="unknown backward"):
        make_quantizer("binary", 1, True, backward="approx")
