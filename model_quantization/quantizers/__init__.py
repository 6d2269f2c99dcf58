"""Quantizers, one module per method, registered by name in :data:`QUANTIZERS`.

=============  =========================================================================================
name           method
=============  =========================================================================================
``lsq``        learned step size (+ optional LSQ+ offset)                     :class:`LSQQuantizer`
``dorefa``     DoReFa-Net: tanh-normalised weights, clipped activations       :class:`DoReFaQuantizer`
``pact``       learnable activation clip                                      :class:`PACTQuantizer`
``lqnet``      learned basis, least-squares fitted (incl. ternary)            :class:`LQNetQuantizer`
``binary``     XNOR-Net weights, Bi-Real / STE sign activations               :class:`BinaryQuantizer`
``minmax``     PTQ observer: running min / max                                :class:`MinMaxObserver`
``ema_minmax`` PTQ observer: moving-average min / max                         :class:`MovingAverageMinMaxObserver`
``percentile`` PTQ observer: mean of per-batch percentiles                    :class:`PercentileObserver`
``mse``        PTQ observer: mean of per-batch MSE-optimal steps                :class:`MSEObserver`
=============  =========================================================================================

Every quantizer is built by :func:`build_quantizer` from a :class:`QuantizerRecipe`. See
:mod:`model_quantization.quantizers.base` for the contract every registered class fulfils.

Adding a method is one module: an options dataclass, a class, one decorator::

    @dataclass(frozen=True)
    class MyOptions(QuantizerOptions):
        scale: float = 1.0

    @QUANTIZERS.register("mine")
    class MyQuantizer(Quantizer):
        Options = MyOptions

        def quantize(self, x):
            ...

        def integer_grid(self, x=None):
            ...
"""

from model_quantization.quantizers.base import (
    GRANULARITIES,
    MAX_BITS,
    QUANTIZERS,
    ROLES,
    GridUnavailable,
    IntegerGrid,
    Quantizer,
    build_quantizer,
    calibration,
    grid_mismatches,
)
from model_quantization.quantizers.binary import BinaryOptions, BinaryQuantizer
from model_quantization.quantizers.dorefa import DoReFaOptions, DoReFaQuantizer
from model_quantization.quantizers.lqnet import LQNetOptions, LQNetQuantizer
from model_quantization.quantizers.lsq import LSQOptions, LSQQuantizer
from model_quantization.quantizers.observers import (
    EMAOptions,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    ObserverQuantizer,
    PercentileObserver,
    PercentileOptions,
)
from model_quantization.quantizers.pact import PACTOptions, PACTQuantizer
from model_quantization.quantizers.recipe import DataDrivenOptions, QuantizerOptions, QuantizerRecipe

__all__ = [
    "GRANULARITIES",
    "MAX_BITS",
    "QUANTIZERS",
    "ROLES",
    "BinaryOptions",
    "BinaryQuantizer",
    "DataDrivenOptions",
    "DoReFaOptions",
    "DoReFaQuantizer",
    "EMAOptions",
    "GridUnavailable",
    "IntegerGrid",
    "LQNetOptions",
    "LQNetQuantizer",
    "LSQOptions",
    "LSQQuantizer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MSEObserver",
    "ObserverQuantizer",
    "PACTOptions",
    "PACTQuantizer",
    "PercentileObserver",
    "PercentileOptions",
    "Quantizer",
    "QuantizerOptions",
    "QuantizerRecipe",
    "build_quantizer",
    "calibration",
    "grid_mismatches",
]
