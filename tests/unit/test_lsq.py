"""LSQ / LSQ+ against independent float64 formulas (Esser et al. 2020; Bhalgat et al. 2020)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tests.unit.quantizer_factory import make_quantizer


def grid(bits: int, signed: bool) -> tuple[int, int]:
    if not signed:
        return 0, 2**bits - 1
    return (1, 1) if bits == 1 else (2 ** (bits - 1), 2 ** (bits - 1) - 1)


def reference(x, step, offset, bits, signed, grad, n_per_step, grad_scale=True):
    """Float64 LSQ: output, input gradient, step gradient, offset gradient (paper eq. 1-3 and LSQ+)."""
    qn, qp = grid(bits, signed)
    v = (x - offset) / step
    if signed and bits == 1:
        level = torch.where(v >= 0, 1.0, -1.0).double()
    else:
        level = torch.floor(torch.clamp(v, -qn, qp) + 0.5)  # ties have probability zero for random data
    out = level * step + offset
    inside = (v >= -qn) & (v <= qp)
    g = 1.0 / math.sqrt(n_per_step * qp) if grad_scale else 1.0
    dstep_elem = torch.where(v < -qn, -float(qn), torch.where(v > qp, float(qp), level - v))
    dx = grad * inside
    return out, dx, grad * dstep_elem * g, grad * (~inside) * g


def _per_channel_sum(t: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return t.sum()
    return t.sum(dim=[d for d in range(t.dim()) if d != axis])


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", range(1, 9))
def test_outputs_lie_on_grid_with_exactly_2_pow_bits_levels(seed, bits, signed):
    qn, qp = grid(bits, signed)
    step = random.Random(seed).uniform(0.01, 1.0)
    q = make_quantizer("lsq", bits, signed, init_value=step).double()
    step = q.step.item()  # the parameter holds the float32-rounded value
    low = -(qn + 2) * step if signed else 0.0
    x = torch.cat([torch.linspace(low, (qp + 2) * step, 20 * (qn + qp + 4)), torch.randn(500) * qp * step])
    if not signed:
        x = x.clamp_min(0)
    out = q(x.double())
    units = out / step
    assert torch.allclose(units, units.round(), atol=1e-9), "outputs are not integer multiples of the step"
    assert units.min() >= -qn - 1e-9 and units.max() <= qp + 1e-9
    assert out.unique().numel() == 2**bits
    if signed and bits == 1:
        assert set(units.round().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize(
    "role,granularity,signed,offset",
    [
        ("activation", "per_tensor", True, False),
        ("activation", "per_tensor", False, False),
        ("activation", "per_tensor", True, True),
        ("weight", "per_tensor", True, False),
        ("weight", "per_channel", True, False),
    ],
)
def test_values_and_gradients_match_float64_reference(seed, role, granularity, signed, offset):
    rng = random.Random(seed)
    bits = rng.randint(1, 8) if signed else rng.randint(1, 8)
    shape = (rng.randint(2, 6), rng.randint(1, 5), rng.randint(1, 4), rng.randint(1, 4))
    channels = shape[0] if granularity == "per_channel" else None
    q = make_quantizer(
        "lsq", bits, signed, granularity, role, num_channels=channels, learnable_offset=offset
    ).double()
    x = torch.randn(shape, dtype=torch.float64) * rng.uniform(0.1, 3.0)
    if not signed:
        x = x.abs()
    with torch.no_grad():
        q.step.copy_(torch.rand(q.step.shape, dtype=torch.float64) * 0.5 + 0.05)
        q.initialized.fill_(True)
        if offset:
            q.offset.fill_(rng.uniform(-0.3, 0.3))
    x.requires_grad_(True)
    grad = torch.randn(shape, dtype=torch.float64)
    out = q(x)
    out.backward(grad)

    axis = 0 if granularity == "per_channel" else None
    step = q.step.detach().reshape(-1, 1, 1, 1) if axis == 0 else q.step.detach()
    beta = q.offset.detach() if offset else torch.tensor(0.0, dtype=torch.float64)
    n_per_step = x.numel() // shape[0]  # weights: one output channel; activations: one example
    if role == "weight" and granularity == "per_tensor":
        n_per_step = x.numel()
    ref_out, ref_dx, ref_dstep, ref_doffset = reference(
        x.detach(), step, beta, bits, signed, grad, n_per_step
    )
    torch.testing.assert_close(out.detach(), ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_dx, rtol=0, atol=0)
    torch.testing.assert_close(q.step.grad, _per_channel_sum(ref_dstep, axis), rtol=1e-10, atol=1e-12)
    if offset:
        torch.testing.assert_close(q.offset.grad, ref_doffset.sum(), rtol=1e-10, atol=1e-12)


def test_gradient_scale_can_be_switched_off(seed):
    bits = random.Random(seed).randint(2, 8)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    grad = torch.randn_like(x)
    grads = []
    for grad_scale in (True, False):
        q = make_quantizer("lsq", bits, True, grad_scale=grad_scale, init_value=0.3).double()
        q(x).backward(grad)
        grads.append(q.step.grad.item())
    qp = 2 ** (bits - 1) - 1
    assert grads[0] == pytest.approx(grads[1] / math.sqrt(3 * 5 * 5 * qp), rel=1e-12)
    step = q.step.item()  # float32-rounded 0.3
    assert grads[1] == pytest.approx(
        reference(x, step, 0.0, bits, True, grad, 1, grad_scale=False)[2].sum().item()
    )


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_data_driven_init_is_two_mean_abs_over_sqrt_qp_on_first_batch(seed, granularity):
    bits = random.Random(seed).randint(2, 8)
    q = make_quantizer("lsq", bits, True, granularity, "weight", num_channels=6)
    w = torch.randn(6, 4, 3, 3) * torch.rand(6, 1, 1, 1)
    assert not q.is_initialized
    q(w)
    qp = 2 ** (bits - 1) - 1
    expected = 2 * w.abs().mean() / math.sqrt(qp)
    if granularity == "per_channel":
        expected = 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(qp)
    torch.testing.assert_close(q.step.detach(), expected)
    assert bool(q.initialized)
    q(w * 10)  # later batches do not re-initialise
    torch.testing.assert_close(q.step.detach(), expected)


def test_init_averages_the_first_init_batches(seed):
    q = make_quantizer("lsq", 3, False, init_batches=3)
    batches = [torch.rand(2, 4, 6, 6) * (i + 1) for i in range(4)]
    estimates = [2 * b.abs().mean() / math.sqrt(7) for b in batches]
    for i, batch in enumerate(batches[:3]):
        assert not q.is_initialized
        q(batch)
        torch.testing.assert_close(q.step.detach(), torch.stack(estimates[: i + 1]).mean())
    assert q.is_initialized
    q(batches[3])
    torch.testing.assert_close(q.step.detach(), torch.stack(estimates[:3]).mean())


def test_reset_initialization_reinitialises_from_the_next_batch(seed):
    q = make_quantizer("lsq", 4, True)
    q(torch.randn(100))
    first = q.step.item()
    q.reset_initialization()
    assert not q.is_initialized
    x = torch.randn(100) * 10
    q(x)
    assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-6)
    assert q.step.item() != first


def test_init_value_skips_data_driven_init():
    q = make_quantizer("lsq", 4, True, init_value=0.125)
    assert q.is_initialized
    q(torch.randn(3, 8) * 100)
    assert q.step.item() == 0.125


def test_state_dict_round_trip_restores_outputs_and_does_not_reinitialise(seed):
    q = make_quantizer("lsq", 3, True, "per_channel", "weight", num_channels=5)
    w = torch.randn(5, 7)
    q(w).pow(2).sum().backward()
    torch.optim.SGD(q.parameters(), lr=0.1).step()  # the step is no longer the data-driven value
    state = q.state_dict()
    assert {"step", "initialized", "init_batches_seen"} <= set(state)

    fresh = make_quantizer("lsq", 3, True, "per_channel", "weight", num_channels=5)
    fresh.load_state_dict(state)
    assert fresh.is_initialized
    other = torch.randn(5, 7) * 3
    assert torch.equal(fresh(other), q(other))
    assert torch.equal(fresh.step, q.step)  # feeding new data did not re-initialise either


def test_float_checkpoint_without_quantizer_keys_leaves_state_for_data_init():
    q = make_quantizer("lsq", 4, True)
    q.load_state_dict({}, strict=True)  # no keys at all: a float model's checkpoint
    assert not q.is_initialized
    with pytest.raises(RuntimeError, match="Missing key"):
        q.load_state_dict({"step": torch.tensor(0.5)}, strict=True)  # partial state is an error


def test_unsigned_quantizer_rejects_negative_input_naming_the_module():
    q = make_quantizer("lsq", 4, False)
    q.owner = "backbone.stem.conv1 (input)"
    with pytest.raises(ValueError, match=r"backbone\.stem\.conv1.*unsigned.*negative"):
        q(torch.tensor([-1.0, 2.0]))


def test_learnable_offset_only_for_signed_activations():
    with pytest.raises(ValueError, match="learnable_offset"):
        make_quantizer("lsq", 4, False, learnable_offset=True)
    with pytest.raises(ValueError, match="learnable_offset"):
        make_quantizer("lsq", 4, True, role="weight", learnable_offset=True)


def test_bits_off_is_identity_without_state():
    q = make_quantizer("lsq", None, True)
    x = torch.randn(3, 4)
    assert q(x) is x
    assert q.state_dict() == {}
