"""The fused fast path (compiled CPU kernel) against the eager analytic path and the naive reference."""

from __future__ import annotations

import os
import random
import shutil

import pytest
import torch

from model_quantization import functional as F
from model_quantization.kernels import cpu as cpu_kernels
from tests.unit.quantizer_factory import make_quantizer

HAVE_COMPILER = any(shutil.which(c) for c in ("cc", "gcc", "clang"))


@pytest.fixture(scope="module")
def kernels():
    if not HAVE_COMPILER:
        pytest.skip("no C compiler on this machine: only the eager path exists")
    if os.environ.get("MODEL_QUANTIZATION_KERNELS", "1").strip().lower() in {"0", "false", "off", "no"}:
        pytest.skip("kernels disabled by MODEL_QUANTIZATION_KERNELS")
    lib = cpu_kernels.load()
    assert lib is not None, f"a C compiler exists but the kernels did not build: {cpu_kernels.status()}"
    return lib


def _run(fn, x, params, grad, backend):
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    with F.backend(backend):
        out = fn(x, *params)
        out.backward(grad)
    return out.detach(), x.grad, [p.grad for p in params]


def _assert_sums_close(actual, expected, terms):
    # Different summation orders: compare relative to the sum of absolute terms (no cancellation luck).
    tolerance = 1e-5 * terms.abs().sum().item() + 1e-6
    assert (actual - expected).abs().max().item() <= tolerance, (actual, expected, tolerance)


@pytest.mark.parametrize(
    "case", ["per_tensor", "per_tensor_offset", "per_tensor_binary", "per_channel_axis0", "per_channel_axis1"]
)
def test_lsq_kernel_equals_eager_and_reference(seed, kernels, case):
    rng = random.Random(seed)
    bits = 1 if case.endswith("binary") else rng.randint(2, 8)
    qn, qp = (1, 1) if bits == 1 else (2 ** (bits - 1), 2 ** (bits - 1) - 1)
    shape = (rng.randint(1, 5), rng.randint(2, 9), rng.randint(1, 33), rng.randint(1, 65))
    x = torch.randn(shape) * rng.uniform(0.2, 4.0)
    grad = torch.randn(shape)
    axis = {"per_channel_axis0": 0, "per_channel_axis1": 1}.get(case)
    channels = 1 if axis is None else shape[axis]
    step = torch.rand(channels if axis is not None else ()) * 0.3 + 0.02
    params = [step]
    if case.endswith("offset"):
        params.append(torch.tensor(rng.uniform(-0.5, 0.5)))

    def bind(function):
        def call(t, s, *offset):
            return function(
                t,
                s,
                qn,
                qp,
                sign_grid=bits == 1,
                grad_scale=0.37,
                offset=offset[0] if offset else None,
                channel_axis=axis,
            )

        return call

    fn, ref = bind(F.lsq_fake_quant), bind(F.lsq_fake_quant_reference)

    fast = _run(fn, x, params, grad, "auto")
    eager = _run(fn, x, params, grad, "eager")
    naive = _run(ref, x, params, grad, "eager")
    for other in (eager, naive):
        assert torch.equal(fast[0], other[0]), "forward values differ"
        for got, expected in zip(fast[2], other[2], strict=True):
            _assert_sums_close(got, expected, grad * x / step.mean())
    assert torch.equal(fast[1], eager[1]), "input gradients differ"
    # autograd computes the reference's input gradient as (g * s) / s: equal up to rounding.
    torch.testing.assert_close(fast[1], naive[1], rtol=1e-6, atol=1e-7)


def test_pact_kernel_equals_eager_and_reference(seed, kernels):
    rng = random.Random(seed)
    levels = 2 ** rng.randint(1, 8) - 1
    x = torch.randn(rng.randint(1, 4), rng.randint(1, 16), rng.randint(1, 40)) * 3
    grad = torch.randn_like(x)
    alpha = torch.tensor(rng.uniform(0.5, 4.0))
    fast = _run(lambda t, a: F.pact_fake_quant(t, a, levels), x, [alpha], grad, "auto")
    eager = _run(lambda t, a: F.pact_fake_quant(t, a, levels), x, [alpha], grad, "eager")
    naive = _run(lambda t, a: F.pact_fake_quant_reference(t, a, levels), x, [alpha], grad, "eager")
    for other in (eager, naive):
        assert torch.equal(fast[0], other[0])
        assert torch.equal(fast[1], other[1])
        _assert_sums_close(fast[2][0], other[2][0], grad)
    assert fast[2][0].item() != 0 or not (x >= alpha).any()


def test_non_contiguous_input_takes_the_eager_path_with_the_same_result(seed, kernels):
    x = torch.randn(6, 8, 10).transpose(1, 2)
    step = torch.tensor(0.2)
    assert not x.is_contiguous()
    with F.backend("eager"):
        expected = F.lsq_fake_quant(x.contiguous(), step, 8, 7)
    assert torch.equal(F.lsq_fake_quant(x, step, 8, 7), expected)


def test_without_kernels_everything_falls_back_to_eager(monkeypatch, seed):
    # A fresh loader state with kernels disabled behaves like a machine without a compiler.
    monkeypatch.setattr(cpu_kernels, "_state", {"loaded": False, "lib": None, "reason": "not built yet"})
    monkeypatch.setenv("MODEL_QUANTIZATION_KERNELS", "0")
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert cpu_kernels.load() is None
    assert "disabled" in cpu_kernels.status()
    x = torch.randn(3, 40, requires_grad=True)
    step = torch.tensor(0.1, requires_grad=True)
    out = F.lsq_fake_quant(x, step, 4, 3)
    torch.testing.assert_close(out, F.lsq_fake_quant_reference(x, step, 4, 3), rtol=0, atol=0)
    out.sum().backward()
    assert step.grad is not None


def test_backend_names_are_validated():
    with pytest.raises(ValueError, match="unknown fake-quant backend 'fast'"):
        F.set_backend("fast")
    assert F.get_backend() == "auto"


def test_straight_through_returns_exact_values_and_identity_gradient(seed):
    x = torch.randn(50, requires_grad=True)
    out = F.round_ste(x * 3)
    assert torch.equal(out, torch.round(x.detach() * 3))
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


def _with_specials(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN, +-inf, +-0 and the gradient kinks of the binary functions (|x| = 1) in it."""
    flat = x.reshape(-1).clone()
    flat[:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, 0.3])
    return flat.reshape(x.shape)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical floats (NaN equal to NaN, -0.0 different from +0.0)."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("name", ["bireal", "ste_clip", "ste_clip_03", "ste_identity"])
def test_binary_kernels_equal_the_eager_path_bit_for_bit(seed, kernels, name):
    fn = {
        "bireal": F.bireal_sign,
        "ste_clip": lambda t: F.sign_ste(t, clip=1.0),
        "ste_clip_03": lambda t: F.sign_ste(t, clip=0.3),
        "ste_identity": lambda t: F.sign_ste(t, clip=None),
    }[name]
    x = _with_specials(torch.randn(3, 5, 7, 11) * 1.5)
    grad = torch.randn_like(x)
    fast, eager = _run(fn, x, [], grad, "auto"), _run(fn, x, [], grad, "eager")
    assert _same_bits(fast[0], eager[0]) and _same_bits(fast[1], eager[1])
    assert set(fast[0].unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("num_levels", [2, 3, 4, 8, 16, 5, 256])
@pytest.mark.parametrize("groups", [1, 6])
# 4099 elements: the vector loop of 8 and 16 levels, its scalar tail, three blocks
@pytest.mark.parametrize("length", ["drawn", 4099])
def test_nearest_level_kernel_equals_eager_values_counts_and_sums(seed, kernels, num_levels, groups, length):
    m = random.Random(seed).choice([1, 7, 2048, 5000]) if length == "drawn" else length
    x = torch.randn(groups, m) * 2
    levels = torch.randn(groups, num_levels).sort(dim=1).values
    x[:, 0] = (levels[:, 0] + levels[:, 1]) / 2  # a value half-way: goes to the lower level
    if m > 8:
        x[0, 1:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30])
    fast = F.nearest_level(x, levels, statistics=True)
    with F.backend("eager"):
        eager = F.nearest_level(x, levels, statistics=True)
    assert fast.index is None, "the kernel ran"
    assert _same_bits(fast.values, eager.values)
    assert torch.equal(fast.counts, eager.counts)
    finite = torch.isfinite(eager.sums)
    assert torch.equal(finite, torch.isfinite(fast.sums))
    terms = torch.zeros_like(eager.sums).scatter_add_(1, eager.index, x.abs().double().nan_to_num(0, 0, 0))
    assert ((fast.sums - eager.sums).abs()[finite] <= 1e-6 * terms[finite] + 1e-9).all()
    # Without statistics only the values (the evaluation path).
    assert _same_bits(F.nearest_level(x, levels).values, eager.values)


def test_lqnet_quantizer_on_the_kernel_matches_the_eager_path(seed, kernels):
    fast = make_quantizer("lqnet", 4, True, momentum=0.5).train()
    eager = make_quantizer("lqnet", 4, True, momentum=0.5).train()
    for step in range(4):
        x = torch.randn(4, 16, 9, 9) * (1 + step)
        before = fast.basis.clone()
        out_fast = fast(x)
        with F.backend("eager"):
            out_eager = eager(x)
        if step > 0:  # the same basis in: the same levels out, bit for bit
            assert _same_bits(out_fast, out_eager)
            assert out_fast.unique().numel() <= 16
        # Initial and refitted bases from the same data: equal to float precision (sums in another order).
        torch.testing.assert_close(fast.basis, eager.basis, rtol=1e-6, atol=0)
        assert not torch.equal(fast.basis, before), "training mode refits the basis"
        eager.basis.copy_(fast.basis)
