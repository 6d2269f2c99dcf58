"""model_quantization: low-bit quantization-aware training for any PyTorch model (imports torch only).

Typical use::

    from model_quantization import QuantSpec, convert

    spec = QuantSpec.from_dict({
        "weight": {"method": "lsq", "bits": 4},
        "activation": {"method": "lsq", "bits": 4, "signed": False},
        "rules": [{"pattern": "stem.conv1", "weight": {"bits": 8}, "activation": {"bits": 8, "signed": True}}],
    })
    model, report = convert(model, spec)
    print(report)

Packages by concern: :mod:`~model_quantization.quantizers` (one module per method, registry
``QUANTIZERS``), :mod:`~model_quantization.functional` (fused fake-quant functions),
:mod:`~model_quantization.nn` (quantized modules, ``Add``), :mod:`~model_quantization.spec`
and :mod:`~model_quantization.convert`. Integrations (``model_quantization.detectron2``, ...) are separate
subpackages and are never imported from here.
"""

from model_quantization.convert import ConversionReport, ConversionResult, convert
from model_quantization.distributed import all_reduce_mean
from model_quantization.nn import Add, QAdd, QConv2d, QConvTranspose2d, QLinear
from model_quantization.quantizers import QUANTIZERS, Quantizer, build_quantizer, calibration
from model_quantization.spec import QuantizerRecipe, QuantSpec, Rule

__version__ = "0.1.0"

__all__ = [
    "QUANTIZERS",
    "Add",
    "ConversionReport",
    "ConversionResult",
    "QAdd",
    "QConv2d",
    "QConvTranspose2d",
    "QLinear",
    "QuantSpec",
    "Quantizer",
    "QuantizerRecipe",
    "Rule",
    "all_reduce_mean",
    "build_quantizer",
    "calibration",
    "convert",
]
