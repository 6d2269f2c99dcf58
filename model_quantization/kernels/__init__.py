"""Optional compiled fast paths for :mod:`model_quantization.functional` (never required for correctness)."""

from model_quantization.kernels import cpu

__all__ = ["cpu"]
