"""Build a quantizer in one call in tests: ``make_quantizer("lsq", 4, True, init_value=0.5)``."""

from __future__ import annotations

from model_quantization.quantizers import QUANTIZERS, Quantizer, QuantizerRecipe, build_quantizer


def make_quantizer(
    method: str,
    bits: int | None,
    signed: bool | None = None,
    granularity: str = "per_tensor",
    role: str = "activation",
    *,
    num_channels: int | None = None,
    channel_axis: int = 0,
    **options,
) -> Quantizer:
    """:func:`build_quantizer` from the recipe these arguments describe; ``signed`` defaults to the first
    signedness the method allows for ``role`` (unsigned PACT/DoReFa activations, signed otherwise)."""
    if signed is None:
        signed = QUANTIZERS.get(method).signedness.get(role, (True,))[0]
    recipe = QuantizerRecipe(method, bits, signed, granularity, options)
    return build_quantizer(recipe, role, channel_axis=channel_axis, num_channels=num_channels)
