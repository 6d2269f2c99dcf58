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
=============  =========================================================================================

See :mod:`model_quantization.quantizers.base` for the contract every registered class fulfils.
"""

from model_quantization.quantizers.base import GRANULARITIES, MAX_BITS, QUANTIZERS, ROLES, Quantizer
from model_quantization.quantizers.binary import BinaryQuantizer
from model_quantization.quantizers.dorefa import DoReFaQuantizer
from model_quantization.quantizers.lqnet import LQNetQuantizer
from model_quantization.quantizers.lsq import LSQQuantizer
from model_quantization.quantizers.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    ObserverQuantizer,
    PercentileObserver,
    calibration,
)
from model_quantization.quantizers.pact import PACTQuantizer

__all__ = [
    "GRANULARITIES",
    "MAX_BITS",
    "QUANTIZERS",
    "ROLES",
    "BinaryQuantizer",
    "DoReFaQuantizer",
    "LQNetQuantizer",
    "LSQQuantizer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "ObserverQuantizer",
    "PACTQuantizer",
    "PercentileObserver",
    "Quantizer",
    "build_quantizer",
    "calibration",
]


def build_quantizer(method: str, **kwargs) -> Quantizer:
    """Instantiate the quantizer registered as ``method`` (``ValueError`` with close names if unknown)."""
    return QUANTIZERS.get(method)(**kwargs)
