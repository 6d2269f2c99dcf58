"""How much storage a model's parameters need once deployed at their quantized bit widths."""

from __future__ import annotations

from torch import nn

from model_quantization.nn.base import QuantizedModule

__all__ = ["FLOAT_BITS", "parameter_bits", "parameter_megabytes"]

#: Bits of a parameter that is not quantized (stored as float32).
FLOAT_BITS = 32


def parameter_bits(model: nn.Module) -> dict[str, int]:
    """Bits per element of every parameter, by qualified name.

    A parameter counts at its quantizer's bit width when a module quantizes it (``weight`` of a
    quantized conv/linear with a weight quantizer that is on); everything else (biases, norms, quantizer
    steps, float layers) counts at 32 bits. Buffers are not counted: BN statistics fold into the
    preceding layer at deployment.
    """
    bits: dict[str, int] = {}
    for module_name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if not isinstance(module, QuantizedModule) or quantizer is None or not quantizer.enabled:
            continue
        bits[f"{module_name}.weight" if module_name else "weight"] = quantizer.bits
    return {name: bits.get(name, FLOAT_BITS) for name, _ in model.named_parameters()}


def parameter_megabytes(model: nn.Module) -> float:
    """Parameter storage in MB (10^6 bytes) at the bit widths of :func:`parameter_bits`."""
    widths = parameter_bits(model)
    total_bits = sum(p.numel() * widths[name] for name, p in model.named_parameters())
    return total_bits / 8 / 1e6
