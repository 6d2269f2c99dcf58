"""The registry and the contract every registered quantizer must fulfil."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from model_quantization.quantizers import (
    QUANTIZERS,
    GridUnavailable,
    Quantizer,
    QuantizerOptions,
    QuantizerRecipe,
    build_quantizer,
)
from model_quantization.registry import Registry

EXPECTED = {"lsq", "dorefa", "pact", "lqnet", "binary", "minmax", "ema_minmax", "percentile", "mse"}


def test_all_methods_are_registered():
    assert set(QUANTIZERS.names()) == EXPECTED


def test_unknown_method_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown quantization method 'lqs'.*'lsq'"):
        QUANTIZERS.get("lqs")
    with pytest.raises(ValueError, match=r"'pact'"):
        build_quantizer(QuantizerRecipe("packt", bits=4, signed=False))


def test_registering_a_name_twice_is_an_error():
    registry: Registry[int] = Registry("thing")
    registry.register("a")(1)
    with pytest.raises(KeyError, match="already registered"):
        registry.register("a")(2)


def _configurations():
    for name in sorted(EXPECTED):
        cls = QUANTIZERS.get(name)
        for role in cls.roles:
            for signed in cls.signedness[role]:
                for granularity in ("per_tensor", "per_channel") if role == "weight" else ("per_tensor",):
                    yield pytest.param(
                        name,
                        role,
                        signed,
                        granularity,
                        id=f"{name}-{role}-{'s' if signed else 'u'}-{granularity}",
                    )


@pytest.mark.parametrize("name,role,signed,granularity", list(_configurations()))
def test_contract(seed, name, role, signed, granularity):
    cls = QUANTIZERS.get(name)
    low, high = cls.bit_range
    bits = random.Random(seed).randint(low, min(high, 4))
    channels = 6
    recipe = QuantizerRecipe(name, bits, signed, granularity)

    def build(recipe=recipe):
        return build_quantizer(recipe, role, num_channels=channels)

    q = build()
    assert isinstance(q, Quantizer) and q.method == name and isinstance(q, cls)
    x = torch.randn(channels, 5, 3, 3) * 2
    if not signed:
        x = x.abs()
    out = q(x)
    # Same shape and dtype, at most 2**bits levels per tensor or per channel.
    assert out.shape == x.shape and out.dtype == x.dtype
    groups = out.reshape(channels, -1) if granularity == "per_channel" else out.reshape(1, -1)
    assert all(g.unique().numel() <= 2**bits for g in groups)
    assert q.is_initialized
    # State dict round trip into a fresh instance reproduces the outputs exactly (eval: no more updates).
    fresh = build()
    fresh.load_state_dict(q.state_dict())
    q.eval()
    fresh.eval()
    other = torch.randn_like(x)
    if not signed:
        other = other.abs()
    assert torch.equal(fresh(other), q(other))
    # "off" is the identity and holds no state.
    off = build(dataclasses.replace(recipe, bits=None))
    assert off(x) is x and not off.state_dict()
    assert f"bits={q.bits_label}" in repr(q)
    # An empty batch (a detection head without proposals) passes through and initialises nothing.
    empty_first = build()
    initial_state = {k: v.clone() for k, v in empty_first.state_dict().items()}
    assert empty_first(x[:0]).shape == x[:0].shape
    assert all(torch.equal(v, empty_first.state_dict()[k]) for k, v in initial_state.items())


@pytest.mark.parametrize("name,role,signed,granularity", list(_configurations()))
def test_grid_contract(seed, name, role, signed, granularity):
    """Every quantizer states its output as integers times a scale, or says why it cannot; a compact
    encoding of its output (the saved activations) expands bit for bit."""
    cls = QUANTIZERS.get(name)
    bits = random.Random(seed).randint(cls.bit_range[0], min(cls.bit_range[1], 4))
    channels = 6
    q = build_quantizer(QuantizerRecipe(name, bits, signed, granularity), role, num_channels=channels)
    x = torch.randn(channels, 5, 3, 3) * 2
    x = x if signed else x.abs()
    out = q(x).detach()
    try:
        grid = q.integer_grid(x)
    except GridUnavailable as exc:
        assert name == "lqnet", f"{name} must state its grid: {exc}"
        return
    codes = grid.codes(out)
    assert torch.equal(codes, codes.round())
    assert grid.qmin <= codes.min() and codes.max() <= grid.qmax
    assert (grid.scale > 0).all() and grid.zero_point == 0
    torch.testing.assert_close(grid.dequantize(codes), out, rtol=1e-6, atol=1e-7)
    if grid.rounding == "sign":
        assert set(codes.unique().tolist()) <= {grid.qmin, grid.qmax}
    packed = q.compact(out)
    if packed is not None:
        assert torch.equal(q.expand(packed), out)


def test_a_quantizer_that_was_never_initialised_has_no_grid():
    q = build_quantizer(QuantizerRecipe("lsq", 4, False))
    with pytest.raises(GridUnavailable, match="never initialised from data"):
        q.integer_grid()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_unknown_option_is_rejected_with_suggestion(name):
    cls = QUANTIZERS.get(name)
    options = [f.name for f in dataclasses.fields(cls.Options)]
    key = options[0] + "x" if options else "grad_scale"
    role = cls.roles[-1]
    recipe = QuantizerRecipe(name, cls.bit_range[0], cls.signedness[role][0], options={key: 1})
    with pytest.raises(ValueError, match=f"unknown option '{key}'"):
        recipe.validate(role)


def test_registering_sets_the_method_name_and_options_are_one_dataclass():
    assert all(QUANTIZERS.get(name).method == name for name in EXPECTED)
    assert all(issubclass(QUANTIZERS.get(name).Options, QuantizerOptions) for name in EXPECTED)
    # Defaults live in the options dataclass, once.
    assert QUANTIZERS.get("lsq").Options().grad_scale is True


def test_bits_out_of_range_and_per_channel_activations_are_rejected():
    def build(bits=4, granularity="per_tensor", role="activation"):
        return build_quantizer(QuantizerRecipe("lsq", bits, True, granularity), role, num_channels=3)

    with pytest.raises(ValueError, match=r"bits: must be an integer in \[1, 8\]"):
        build(bits=9)
    with pytest.raises(ValueError, match=r"bits: must be an integer in \[1, 8\]"):
        build(bits=0)
    with pytest.raises(ValueError, match="only supported for weights"):
        build(granularity="per_channel")
    with pytest.raises(ValueError, match=r"unknown granularity 'per-channel'.*'per_channel'"):
        build(granularity="per-channel")
