"""``python -m model_quantization.export`` (``nox -s export``): a trained detector to an integer ONNX file.

Usage::

    python -m model_quantization.export --config-file CONFIG --weights model_final.pth [--output model.onnx]
        [--eval] [--parity-images N] [--weight-container auto|int8|uint8] [KEY VALUE ...]

Writes the ONNX file (atomically: nothing at the output path unless the export succeeds) and prints the
export report: opset, quantized nodes, integer convolutions in ONNX Runtime's optimized graph (gate 4), file
size, and reference/engine parity on a few test images (gates 1 and 2). ``--eval`` also evaluates the ONNX
model on the config's test set with COCOEvaluator and prints its AP next to the PyTorch fake-quant AP.
Exit status: 0 when the file was written and every measured gate passed, 1 on a refused export (the
message says why), 3 when the file was written but a gate failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["load_model", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from model_quantization.deploy.api import EXPORT_KERNELS
    from model_quantization.deploy.parity import MIN_COSINE

    parser = argparse.ArgumentParser(
        prog="python -m model_quantization.export",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, type=Path, help="a RetinaNet or FCOS config")
    parser.add_argument("--weights", required=True, type=Path, help="the trained model (model_final.pth)")
    parser.add_argument("--output", type=Path, help="the ONNX file to write (default: next to the weights)")
    parser.add_argument("--eval", action="store_true", help="evaluate ONNX and PyTorch on the test set (AP)")
    parser.add_argument("--parity-images", type=int, default=4, help="test images for gates 1-2 (0: skip)")
    parser.add_argument(
        "--weight-container",
        choices=("auto", "int8", "uint8"),
        default="auto",
        help="int8 weights where no CPU kernel can saturate, uint8 + 128 else (auto); int8 is fastest on VNNI",
    )
    parser.add_argument(
        "--kernels",
        choices=EXPORT_KERNELS,
        default="auto",
        help="auto: fused unless gate 2 fails on the parity images, then exact (default); "
        "fused: QLinearConv where ONNX Runtime fuses (int32 biases), ConvInteger elsewhere; "
        "exact: ConvInteger everywhere (float biases: bit-faithful to the Q/DQ reference, slower); "
        "qdq: the plain Q/DQ graph for other runtimes",
    )
    parser.add_argument(
        "--min-engine-cosine",
        type=float,
        default=MIN_COSINE,
        help=f"with --kernels auto: least head-output cosine of the fused engine vs the reference that keeps "
        f"it (default {MIN_COSINE}, gate 2; 1.0: only an exact engine)",
    )
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: its own)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser.parse_args(argv)


def load_cfg(config_file: Path, opts: list[str]):
    """The config (AdelaiDet's defaults, a superset of detectron2's) with ``opts`` merged, frozen."""
    import adet.modeling  # noqa: F401  (registers AdelaiDet's meta-architectures)
    from adet.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


def load_model(cfg, weights: Path):
    """Build the model of ``cfg`` and load ``weights``; a missing or mismatched file is an ExportError.

    detectron2's loader only logs missing, unexpected and wrongly shaped keys; deploying such a model would
    silently ship random weights, so any of them is an error here (quantizer state may be missing: a float
    checkpoint then fails later, naming the first quantizer never initialised from data).
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from model_quantization.deploy import ExportError

    class Checkpointer(DetectionCheckpointer):
        """Keeps what fvcore's ``_load_model`` (its extension point) found incompatible."""

        incompatible = None

        def _load_model(self, checkpoint):
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    if not weights.is_file():
        raise ExportError(f"weights file {str(weights)!r} does not exist")
    model = build_model(cfg)
    checkpointer = Checkpointer(model)
    try:
        checkpointer.load(str(weights))
    except Exception as exc:  # a truncated or foreign file: say which
        raise ExportError(f"cannot read weights file {str(weights)!r}: {exc}") from exc
    incompatible = checkpointer.incompatible
    problems = []
    if incompatible is None:
        problems.append("the file holds no model")
    else:
        if incompatible.incorrect_shapes:
            key = incompatible.incorrect_shapes[0][0]
            problems.append(f"{len(incompatible.incorrect_shapes)} with other shapes ({key}, ...)")
        missing = [k for k in incompatible.missing_keys if "quantizer" not in k]
        if missing:
            problems.append(f"{len(missing)} missing ({', '.join(missing[:3])}, ...)")
        unexpected = [k for k in incompatible.unexpected_keys if "quantizer" not in k]
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}, ...)")
    if problems:
        raise ExportError(
            f"weights file {str(weights)!r} does not match the model of the config: keys "
            + "; ".join(problems)
        )
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from model_quantization.deploy import ExportError, evaluate_onnx, evaluate_pytorch, export_model

    output = args.output or args.weights.with_suffix(".onnx")
    try:
        cfg = load_cfg(args.config_file, args.opts)
        model = load_model(cfg, args.weights)
        report = export_model(
            cfg,
            model,
            output,
            parity_images=args.parity_images,
            weight_container=args.weight_container,
            kernels=args.kernels,
            threads=1 if args.threads is None else args.threads,
            min_engine_cosine=args.min_engine_cosine,
        )
    except ExportError as exc:
        print(f"export refused: {exc}", file=sys.stderr)
        return 1
    print(report)
    if args.eval:
        onnx_metrics = evaluate_onnx(cfg, output, model=model, threads=args.threads)["bbox"]
        torch_metrics = evaluate_pytorch(cfg, model)["bbox"]
        print(f"\nbox AP on {cfg.DATASETS.TEST[0]} (COCOEvaluator):")
        print(f"  {'model':<28}{'AP':>7}{'AP50':>7}{'AP75':>7}")
        for label, metrics in (
            ("PyTorch fake-quant", torch_metrics),
            ("ONNX Runtime (integer)", onnx_metrics),
        ):
            print(f"  {label:<28}{metrics['AP']:7.2f}{metrics['AP50']:7.2f}{metrics['AP75']:7.2f}")
        print(f"  {'delta AP':<28}{onnx_metrics['AP'] - torch_metrics['AP']:7.2f}")
    if not report.passed:
        print(f"\n{output} was written, but a gate failed (see above)", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
