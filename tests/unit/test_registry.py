"""The registry and the contract every registered quantizer must fulfil."""

from __future__ import annotations

import random

import pytest
import torch

from model_quantization.quantizers import QUANTIZERS, Quantizer, build_quantizer
from model_quantization.registry import Registry

EXPECTED = {"lsq", "dorefa", "pact", "lqnet", "binary", "minmax", "ema_minmax", "percentile"}


def test_all_methods_are_registered():
    assert set(QUANTIZERS.names()) == EXPECTED


def test_unknown_method_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown quantization method 'lqs'.*'lsq'"):
        QUANTIZERS.get("lqs")
    with pytest.raises(ValueError, match=r"'pact'"):
        build_quantizer("packt", bits=4, signed=False)


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
    kwargs = dict(bits=bits, signed=signed, granularity=granularity, role=role, num_channels=channels)
    q = cls(**kwargs)
    assert isinstance(q, Quantizer) and q.method == name
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
    fresh = cls(**kwargs)
    fresh.load_state_dict(q.state_dict())
    q.eval()
    fresh.eval()
    other = torch.randn_like(x)
    if not signed:
        other = other.abs()
    assert torch.equal(fresh(other), q(other))
    # "off" is the identity and holds no state.
    off = cls(**{**kwargs, "bits": None})
    assert off(x) is x and not off.state_dict()
    assert f"bits={q.bits_label}" in repr(q)
    # An empty batch (a detection head without proposals) passes through and initialises nothing.
    empty_first = cls(**kwargs)
    initial_state = {k: v.clone() for k, v in empty_first.state_dict().items()}
    assert empty_first(x[:0]).shape == x[:0].shape
    assert all(torch.equal(v, empty_first.state_dict()[k]) for k, v in initial_state.items())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_unknown_option_is_rejected_with_suggestion(name):
    cls = QUANTIZERS.get(name)
    options = cls.option_names()
    key = options[0] + "x" if options else "grad_scale"
    with pytest.raises(ValueError, match=f"unknown option '{key}'"):
        cls.check_config(
            cls.bit_range[0], True in cls.signedness[cls.roles[-1]], "per_tensor", cls.roles[-1], **{key: 1}
        )


def test_bits_out_of_range_and_per_channel_activations_are_rejected():
    with pytest.raises(ValueError, match=r"bits must be an integer in \[1, 8\]"):
        QUANTIZERS.get("lsq")(bits=9)
    with pytest.raises(ValueError, match=r"bits must be an integer in \[1, 8\]"):
        QUANTIZERS.get("lsq")(bits=0)
    with pytest.raises(ValueError, match="only supported for weights"):
        QUANTIZERS.get("lsq")(bits=4, granularity="per_channel", role="activation", num_channels=3)
    with pytest.raises(ValueError, match=r"unknown granularity 'per-channel'.*'per_channel'"):
        QUANTIZERS.get("lsq")(bits=4, granularity="per-channel")
