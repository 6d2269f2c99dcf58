"""detectron2 integration: ``MODEL.QUANTIZATION`` config, the build-time hook, datasets, optimizer settings.

The patch series in ``patches/detectron2`` calls into this package from three places: the config defaults
(:func:`add_quantization_config`), ``build_model`` (:func:`quantize`) and ``build_optimizer``
(:func:`quantizer_overrides`); ``detectron2.data.datasets.builtin`` registers the shapes dataset.

Only :mod:`.config` is imported eagerly: it runs while ``detectron2.config`` itself is being imported, so
it must not import detectron2. Everything else is loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import QuantizationConfig, add_quantization_config, parse_quantization_config

__all__ = [
    "QuantizationConfig",
    "add_quantization_config",
    "apply_architecture_options",
    "quantize",
    "quantizer_overrides",
    "register_default_shapes",
    "parse_quantization_config",
    "register_shapes",
]

_LAZY = {
    "quantize": ".modeling",
    "apply_architecture_options": ".modeling",
    "quantizer_overrides": ".optimizer",
    "register_shapes": ".datasets",
    "register_default_shapes": ".datasets",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
