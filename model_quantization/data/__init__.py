"""The embedded default dataset (synthetic COCO-format shapes); see :mod:`model_quantization.data.shapes`."""

from .shapes import CLASS_NAMES, DEFAULT_CACHE, ShapesSpec, materialize, render_image

__all__ = ["CLASS_NAMES", "DEFAULT_CACHE", "ShapesSpec", "materialize", "render_image"]
