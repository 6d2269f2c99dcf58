"""Deployment: quantized detectors as standard integer ONNX graphs, run by ONNX Runtime, with parity gates.

Public API::

    from model_quantization.deploy import export_model, evaluate_onnx

    report = export_model(cfg, model, "model.onnx")   # -> ExportReport (print it), gates 1, 2, 4 measured
    metrics = evaluate_onnx(cfg, "model.onnx")       # -> {"bbox": {"AP": ..., ...}} via COCOEvaluator

Command line: ``python -m model_quantization.export --config-file ... --weights ...`` (``nox -s export``).

Layout, by concern:

* :mod:`.grids` reads every quantizer's public integer grid (activation Q/DQ parameters, int8 weight codes)
  or refuses with :class:`ExportError`; :mod:`.norms` turns norms into foldable per-level affines.
* :mod:`.lowering`: the export handlers (:data:`EXPORT_HANDLERS`, a registry keyed by quantized module
  type) that replace quantized modules by explicit Q/DQ ops with folded norms; :mod:`.ops`: those ops as
  PyTorch custom ops and their ONNX translations.
* :mod:`.exporter`: lowering + ``torch.onnx.export(dynamo=True)`` + :mod:`.onnx_passes` (integer kernels
  for ONNX Runtime); atomic writes.
* :mod:`.runtime`: ONNX Runtime sessions, the optimized graph, integer coverage; :mod:`.parity`: gates 1-2.
* :mod:`.detectors` (imports detectron2): RetinaNet/FCOS adapters that cut a detector into the network and
  upstream's own pre/post-processing; :mod:`.api`: :func:`export_model`, :class:`OnnxDetector`,
  :func:`evaluate_onnx`.

Only the detector-level names import detectron2, on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .exporter import DEFAULT_OPSET, ExportedNetwork, export_network, write_atomic
from .grids import ExportError
from .lowering import CONV_EPILOGUES, EXPORT_HANDLERS, register_export_handler
from .norms import NORM_AFFINES
from .parity import (
    CodeDivergence,
    EngineParity,
    ReferenceParity,
    engine_divergence,
    engine_parity,
    reference_parity,
    without_conv_biases,
)
from .runtime import Coverage, cpu_isa, integer_coverage, make_session

__all__ = [
    "CONV_EPILOGUES",
    "DEFAULT_OPSET",
    "DETECTORS",
    "EXPORT_HANDLERS",
    "MIN_INTEGER_COVERAGE",
    "NORM_AFFINES",
    "Coverage",
    "CodeDivergence",
    "EngineParity",
    "ExportError",
    "ExportReport",
    "ExportedNetwork",
    "OnnxDetector",
    "ReferenceParity",
    "adapter_for",
    "cpu_isa",
    "engine_divergence",
    "engine_parity",
    "evaluate_onnx",
    "evaluate_pytorch",
    "export_model",
    "export_network",
    "integer_coverage",
    "make_session",
    "reference_parity",
    "register_export_handler",
    "sample_inputs",
    "without_conv_biases",
    "write_atomic",
]

_LAZY = {
    "DETECTORS": ".detectors",
    "adapter_for": ".detectors",
    "MIN_INTEGER_COVERAGE": ".api",
    "ExportReport": ".api",
    "OnnxDetector": ".api",
    "evaluate_onnx": ".api",
    "evaluate_pytorch": ".api",
    "export_model": ".api",
    "sample_inputs": ".api",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
