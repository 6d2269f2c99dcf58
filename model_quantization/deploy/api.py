"""Detector-level API: export a detectron2/AdelaiDet model with its report, and evaluate the ONNX model.

``export_model(cfg, model, path) -> ExportReport`` writes the deploy graph (atomically) and measures the
gates on a few images of the config's test set; ``evaluate_onnx(cfg, path) -> metrics`` runs the ONNX model
in ONNX Runtime through upstream's post-processing under detectron2's ``inference_on_dataset`` and
``COCOEvaluator``, exactly like the PyTorch model is evaluated (same test mapper, same resizing).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch
from torch import nn

from .detectors import DetectorAdapter, adapter_for
from .exporter import DEFAULT_OPSET, ExportedNetwork, export_network, node_counts, with_kernels, write_atomic
from .lowering import LoweringSummary
from .onnx_passes import KERNELS, PassReport
from .parity import MIN_COSINE, EngineParity, ReferenceParity, engine_parity, reference_parity
from .runtime import Coverage, integer_coverage, make_session

__all__ = [
    "EXPORT_KERNELS",
    "MIN_INTEGER_COVERAGE",
    "ExportReport",
    "OnnxDetector",
    "evaluate_onnx",
    "evaluate_pytorch",
    "export_model",
    "sample_inputs",
]

#: Gate 4: share of the quantized convolutions that must run on integer kernels.
MIN_INTEGER_COVERAGE = 0.95
REPORTED_OPS = ("QuantizeLinear", "DequantizeLinear", "Clip", "ConvInteger", "Conv")
#: ``kernels`` of :func:`export_model`: ``auto`` (fused unless gate 2 says otherwise) or one of the graph's.
EXPORT_KERNELS = ("auto", *KERNELS)


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and measured (``str()`` is the printed report)."""

    path: Path
    architecture: str
    opset: int
    file_bytes: int
    outputs: list[str]
    nodes: dict[str, int]
    lowering: LoweringSummary
    passes: PassReport
    coverage: Coverage
    reference: ReferenceParity | None = None
    engine: EngineParity | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return bool(self.lowering.modules)

    @property
    def coverage_passed(self) -> bool:
        return self.coverage.fraction >= MIN_INTEGER_COVERAGE

    @property
    def passed(self) -> bool:
        """Gates 1, 2 and 4 (those measured)."""
        checks = [self.coverage_passed]
        checks += [g.passed for g in (self.reference, self.engine) if g is not None]
        return all(checks)

    def __str__(self) -> str:
        low = self.lowering
        lines = [
            f"ONNX export: {self.path} ({self.file_bytes / 1e6:.2f} MB, opset {self.opset}, {self.seconds:.0f} s)",
            f"  network: {self.architecture}; input image [N, 3, H, W] (raw BGR/RGB as the config reads it, padded "
            f"with the pixel mean); {len(self.outputs)} outputs: {', '.join(self.outputs[:3])}, ...",
        ]
        if self.quantized:
            bits = _histogram(a.bits for a in low.activations)
            wbits = _histogram(low.weight_bits.values())
            stored = _histogram(
                f"{w.container} x{w.spread[0]}" + (f"-{w.spread[1]}" if w.spread[1] != w.spread[0] else "")
                for w in self.passes.weights
            )
            lines += [
                f"  quantized: {len(low.modules)} modules; activations {len(low.activations)} Q/DQ (bits {bits}); "
                f"weights {len(low.weight_bits)} (bits {wbits}; stored {stored})",
                f"  nodes ({self.passes.kernels} kernels): {', '.join(f'{op} {n}' for op, n in self.nodes.items())}",
                f"  norms folded: {len(low.folded_norms)}; left as float ops: {len(low.unfolded_norms)}; "
                f"biases trained on the int32 grid (INTEGER_BIAS): {len(low.integer_biases)}; "
                f"8-bit conv outputs (OUTPUT_QUANTIZERS): {len(low.output_quantizers)}"
                + (
                    f"; negative weight scales: {'; '.join(low.negative_scales)}"
                    if low.negative_scales
                    else ""
                ),
            ]
        gate4 = "PASS" if self.coverage_passed else "FAIL"
        lines.append(
            f"  gate 4 integer kernels (ONNX Runtime {onnxruntime.__version__}, optimized graph): {gate4}: "
            f"{self.coverage} (need >= {MIN_INTEGER_COVERAGE:.0%})"
        )
        if self.reference is not None:
            lines.append(
                f"  gate 1 reference parity (ORT_DISABLE_ALL vs PyTorch fake-quant): {self.reference}"
            )
        if self.engine is not None:
            lines.append(f"  gate 2 engine parity (ORT_ENABLE_ALL vs ORT_DISABLE_ALL): {self.engine}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _histogram(values) -> str:
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{k}: {n}" for k, n in sorted(counts.items(), key=lambda kv: str(kv[0]))) or "-"


def sample_inputs(cfg, count: int, dataset: str | None = None) -> list[dict]:
    """The first ``count`` inputs of the config's test set, through detectron2's test mapper."""
    from detectron2.data import DatasetCatalog, DatasetMapper

    name = dataset or cfg.DATASETS.TEST[0]
    mapper = DatasetMapper(cfg, is_train=False)
    return [mapper(d) for d in DatasetCatalog.get(name)[:count]]


def export_model(
    cfg,
    model: nn.Module,
    path: str | os.PathLike,
    *,
    parity_images: int = 2,
    weight_container: str = "auto",
    kernels: str = "auto",
    opset: int = DEFAULT_OPSET,
    threads: int | None = 1,
    dataset: str | None = None,
    min_engine_cosine: float = MIN_COSINE,
) -> ExportReport:
    """Export ``model`` (RetinaNet or FCOS, float or quantized, with its weights) to ``path``.

    The file is written through a temporary name and renamed, so a failure never leaves a partial file.

    Args:
        cfg: the model's config (its test set gives the parity images).
        model: the built detector with its trained weights (quantizers initialised).
        path: where to write the ONNX file.
        parity_images: test images on which gates 1 and 2 are measured (0: skip them).
        weight_container: see :func:`~.onnx_passes.store_weights`.
        kernels: ``"fused"``, ``"exact"`` or ``"qdq"`` (see :func:`~.exporter.export_network`), or
            ``"auto"``: fused, unless gate 2 on the parity images finds the fused engine's head outputs
            further from the reference than ``min_engine_cosine``; then the network is exported again with
            exact kernels (bit-faithful to the reference, but at about fp32 speed) and a note says why. The
            fused kernels add biases as int32 in units of ``s_x * s_w``; a value that this rounding moves
            across a rounding tie takes the neighbouring level, and in some low-bit networks those flips
            multiply layer by layer (measured: a trained RetinaNet LSQ 4/4 whose fused export lost 1.1 AP,
            min cosine 0.96, while two others of the same recipe lost <= 0.13). Without parity images
            (``parity_images=0``) ``auto`` is fused, unchecked.
        opset: ONNX opset (>= 17).
        threads: ONNX Runtime threads for the checks.
        dataset: test set for the parity images (default: ``cfg.DATASETS.TEST[0]``).
        min_engine_cosine: with ``kernels="auto"``, the least cosine of every head output between the fused
            engine and the reference that keeps the fused kernels (gate 2's threshold by default; 1.0 asks
            for an engine that reproduces the reference exactly).

    Raises:
        ExportError: an unsupported meta-architecture, module or quantizer (the message says which/why).
    """
    if kernels not in EXPORT_KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(EXPORT_KERNELS)}, not {kernels!r}")
    start = time.perf_counter()
    adapter = adapter_for(model)
    was_training = model.training
    model.eval()
    try:
        network = adapter.network()
        images = []
        if parity_images > 0:
            images = [adapter.preprocess([x])[0] for x in sample_inputs(cfg, parity_images, dataset)]

        def measured(exported: ExportedNetwork) -> ExportReport:
            report = ExportReport(
                path=Path(path),
                architecture=adapter.description,
                opset=opset,
                file_bytes=0,
                outputs=exported.output_names,
                nodes=node_counts(exported.deploy, REPORTED_OPS),
                lowering=exported.lowering,
                passes=exported.passes,
                coverage=integer_coverage(exported.deploy, threads),
            )
            if images:
                measure_parity(report, network, exported, images, threads)
            return report

        exported = export_network(
            network,
            adapter.example_input(),
            adapter.output_names(),
            dynamic_shapes=adapter.dynamic_shapes(),
            opset=opset,
            weight_container=weight_container,
            kernels="fused" if kernels == "auto" else kernels,
        )
        report = measured(exported)
        if kernels == "auto" and report.engine is not None and report.engine.min_cosine < min_engine_cosine:
            fused = report.engine
            exported = with_kernels(exported, "exact")
            report = measured(exported)
            report.notes.append(
                f"kernels auto: the fused integer kernels failed gate 2 (min cosine {fused.min_cosine:.6f} < "
                f"{min_engine_cosine}; {fused}), so every quantized conv is a ConvInteger with a float "
                f"rescale and bias (exact, at about fp32 speed)"
            )
        elif kernels == "auto" and not images:
            report.notes.append("kernels auto without parity images: fused kernels, gate 2 not measured")
        unfused = len(report.passes.convinteger)
        if report.passes.kernels == "fused" and unfused:
            report.notes.append(
                f"{unfused} conv nodes keep a float output (ConvInteger + rescale, about 4x slower per "
                f"multiply-add than QLinearConv): MODEL.QUANTIZATION.OUTPUT_QUANTIZERS puts them on int8-out "
                f"kernels (model_quantization.detectron2.architectures.INTEGER_OUTPUTS lists them for "
                f"RetinaNet and FCOS)"
            )
        report.file_bytes = write_atomic(exported.deploy, path)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    return report


def measure_parity(
    report: ExportReport,
    network: nn.Module,
    exported: ExportedNetwork,
    images: Sequence[torch.Tensor],
    threads: int | None = 1,
) -> None:
    """Gates 1 and 2 on ``images`` (network inputs), into ``report``."""
    report.reference = reference_parity(
        network, exported.debug, exported.output_names, exported.lowering.activations, images, threads
    )
    report.engine = engine_parity(exported.deploy, images, threads)


class OnnxDetector(nn.Module):
    """A detectron2-style model whose network runs in ONNX Runtime, with upstream's post-processing.

    ``forward(batched_inputs)`` takes and returns what the PyTorch detector does (a list of dicts with
    ``"image"``, optionally ``"height"``/``"width"``; a list of ``{"instances": Instances}``), so it plugs
    into ``inference_on_dataset`` and any evaluator.

    Args:
        model: a detector built from the same config (its post-processing settings are used; its weights
            are not).
        onnx_model: path, bytes or ``ModelProto`` of the exported network.
        threads: ONNX Runtime intra-op threads (None: its default).
        optimize: integer kernels (True) or the unoptimized Q/DQ reference (False).
    """

    def __init__(
        self,
        model: nn.Module,
        onnx_model: str | os.PathLike | bytes | onnx.ModelProto,
        *,
        threads: int | None = None,
        optimize: bool = True,
    ) -> None:
        super().__init__()
        self.adapter: DetectorAdapter = adapter_for(model)
        self.model = model.eval()
        self.session = make_session(onnx_model, optimize=optimize, threads=threads)
        self.output_names = self.adapter.output_names()
        self.input_name = self.session.get_inputs()[0].name

    @torch.no_grad()
    def forward(self, batched_inputs: Sequence[dict]) -> list[dict]:
        image, sizes = self.adapter.preprocess(batched_inputs)
        outputs = self.session.run(self.output_names, {self.input_name: image.numpy()})
        self.model.eval()
        return self.adapter.postprocess([torch.from_numpy(o) for o in outputs], sizes, batched_inputs)


def _evaluate(cfg, model: nn.Module, dataset: str | None) -> dict:
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    name = dataset or cfg.DATASETS.TEST[0]
    loader = build_detection_test_loader(cfg, name)
    evaluator = COCOEvaluator(name, tasks=("bbox",), distributed=False, output_dir=None)
    return dict(inference_on_dataset(model, loader, evaluator))


def evaluate_onnx(
    cfg,
    onnx_model: str | os.PathLike | bytes | onnx.ModelProto,
    *,
    model: nn.Module | None = None,
    dataset: str | None = None,
    threads: int | None = None,
    optimize: bool = True,
) -> dict:
    """COCO box metrics of the ONNX model on the config's test set (or ``dataset``): ``{"bbox": {"AP": ...}}``.

    Args:
        cfg: the config the model was exported from (test mapper, post-processing settings).
        onnx_model: the exported file.
        model: a detector built from ``cfg`` for its post-processing (default: ``build_model(cfg)``,
            no weights needed).
        dataset: a registered dataset name (default: ``cfg.DATASETS.TEST[0]``).
        threads: ONNX Runtime threads.
        optimize: integer kernels (True) or the Q/DQ reference session (False).
    """
    if model is None:
        from detectron2.modeling import build_model

        model = build_model(cfg)
    return _evaluate(cfg, OnnxDetector(model, onnx_model, threads=threads, optimize=optimize), dataset)


def evaluate_pytorch(cfg, model: nn.Module, *, dataset: str | None = None) -> dict:
    """The same metrics for the PyTorch (fake-quant) model, for the side-by-side ``--eval`` table."""
    return _evaluate(cfg, model, dataset)
