"""Post-training quantization: calibrate a quantized detector on training images, no training.

``python -m model_quantization.calibrate --config-file <quantized cfg> --weights <float model_final.pth>``
(``nox -s calibrate -- ...``) builds the quantized model of the config, loads the float weights, runs
``--images`` images of ``DATASETS.TRAIN`` through it in eval mode with no gradients while every quantizer
folds what it sees into its data-driven state (:func:`model_quantization.quantizers.calibration`), freezes
that state, writes a checkpoint (``--output``) and prints the AP on ``DATASETS.TEST`` next to the float
model's.

The images go through the *test* mapper (the deterministic resize evaluation uses, no flip, no
multi-scale): ranges are calibrated on exactly the kind of input the deployed model sees, and a
training augmentation would only widen them. Which images: a random subset of ``DATASETS.TRAIN`` drawn
with ``--seed``.

What calibration sets, per method: observers (``minmax``, ``ema_minmax``, ``percentile``, ``mse``) their
ranges over all batches; ``lsq`` its step, the mean over all batches of its ``init_method`` estimate (the
paper's ``mean_abs`` or, in this project's configs, ``mse``); ``pact`` its clip when ``init_value`` is
null (else it keeps the configured clip); ``lqnet`` its basis; ``dorefa`` and ``binary`` have no
data-driven state. The report says which quantizers were calibrated how. The checkpoint loads into
``train_net.py --eval-only``, the ONNX exporter, and a QAT fine-tune of the same config (``MODEL.WEIGHTS``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model_quantization.detectron2.config import float_config
from model_quantization.quantizers import Quantizer, calibration

__all__ = ["MIN_IMAGES", "CalibrationReport", "calibrate_detector", "calibration_loader", "main"]

logger = logging.getLogger("model_quantization.calibrate")  # also when run as __main__

#: Fewer images than this give ranges that hinge on a handful of pictures.
MIN_IMAGES = 8
DEFAULT_IMAGES = 256


@dataclass
class CalibrationReport:
    """What a calibration did: images, time, and how many quantizers of each method it set."""

    images: int
    batches: int
    seconds: float
    methods: dict[str, int] = field(default_factory=dict)
    stateless: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        set_ = ", ".join(f"{n} {m}" for m, n in sorted(self.methods.items())) or "none"
        fixed = ", ".join(f"{n} {m}" for m, n in sorted(self.stateless.items()))
        return (
            f"calibrated {set_} quantizer(s) on {self.images} images ({self.batches} batches) in "
            f"{self.seconds:.1f} s" + (f"; stateless (nothing to calibrate): {fixed}" if fixed else "")
        )


def calibration_loader(cfg, num_images: int, seed: int = 0, batch_size: int | None = None):
    """``num_images`` images of ``cfg.DATASETS.TRAIN`` (a random subset drawn with `seed`) through the
    test mapper, in batches of ``SOLVER.IMS_PER_BATCH`` (or `batch_size`).

    Raises:
        ValueError: fewer than :data:`MIN_IMAGES` images asked for, or more than the dataset holds.
    """
    from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader

    if num_images < MIN_IMAGES:
        raise ValueError(
            f"--images {num_images}: calibrate on at least {MIN_IMAGES} images (default {DEFAULT_IMAGES}); "
            f"ranges from fewer hinge on a handful of pictures"
        )
    dicts = [d for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)]
    if num_images > len(dicts):
        raise ValueError(
            f"--images {num_images}: DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)} holds only {len(dicts)} images"
        )
    picks = torch.randperm(len(dicts), generator=torch.Generator().manual_seed(seed))[:num_images]
    subset = [dicts[i] for i in sorted(picks.tolist())]
    batch = batch_size or max(1, min(cfg.SOLVER.IMS_PER_BATCH, num_images))
    return build_detection_test_loader(
        subset,
        mapper=DatasetMapper(cfg, is_train=False),
        batch_size=batch,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def _progress(done: int, total: int, start: float) -> None:
    """A progress bar on a terminal, a line every quarter otherwise (logs)."""
    if sys.stderr.isatty():
        width = 30
        filled = round(width * done / total)
        sys.stderr.write(f"\rcalibrating [{'#' * filled}{'.' * (width - filled)}] {done}/{total} images "
                         f"{time.perf_counter() - start:.0f} s")  # fmt: skip
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    elif done == total or done * 4 // total != (done - 1) * 4 // total:
        logger.info("calibrating: %d/%d images (%.0f s)", done, total, time.perf_counter() - start)


@torch.no_grad()
def calibrate_detector(cfg, model: nn.Module, num_images: int | None = None, seed: int = 0, loader=None):
    """Calibrate every quantizer of `model` on calibration images; returns a :class:`CalibrationReport`.

    Args:
        cfg: the model's config (``DATASETS.TRAIN``, the test mapper's resizing).
        model: a quantized detector with its float weights loaded.
        num_images: how many images (default 256).
        seed: which images (a random subset of ``DATASETS.TRAIN``).
        loader: batches to use instead (lists of detectron2 input dicts).

    Raises:
        ValueError: the model has no quantizers (a float config), too few images, or a quantizer that the
            calibration images never reached (a branch evaluation does not run).
    """
    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, Quantizer) and m.enabled}
    if not quantizers:
        raise ValueError(
            "nothing to calibrate: the model has no quantizers (MODEL.QUANTIZATION.ENABLED is False or every "
            "bit width is off); use a quantized config such as configs/*/shapes/*_ptq_w8a8.yaml"
        )
    num_images = DEFAULT_IMAGES if num_images is None else num_images
    if loader is None:
        loader = calibration_loader(cfg, num_images, seed)
    total = num_images
    training = model.training
    model.eval()
    start = time.perf_counter()
    seen = batches = 0
    try:
        with calibration(model, reset=True):
            for inputs in loader:
                model(inputs)
                seen, batches = seen + len(inputs), batches + 1
                _progress(min(seen, total), total, start)
    finally:
        model.train(training)
    missed = [name for name, q in quantizers.items() if q.data_driven and not q.is_initialized]
    if missed:
        raise ValueError(
            f"{len(missed)} quantizer(s) saw no calibration data (their modules do not run at inference): "
            f"{', '.join(missed[:5])}{', ...' if len(missed) > 5 else ''}"
        )
    return CalibrationReport(
        images=seen,
        batches=batches,
        seconds=time.perf_counter() - start,
        methods=dict(Counter(q.method for q in quantizers.values() if q.data_driven)),
        stateless=dict(Counter(q.method for q in quantizers.values() if not q.data_driven)),
    )


def load_float_weights(model: nn.Module, path: str) -> None:
    """Load a float detector checkpoint into the quantized `model`; every float weight must be in it.

    Raises:
        ValueError: the file is missing, or it is another architecture's (weights of the model missing
            from it or of another shape).
    """
    from detectron2.checkpoint import DetectionCheckpointer

    if not Path(path).is_file():
        raise ValueError(f"--weights {path}: no such file")

    class Checked(DetectionCheckpointer):
        def _load_model(self, checkpoint):
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    checkpointer = Checked(model)
    checkpointer.load(path)
    quantizer_names = {name for name, m in model.named_modules() if isinstance(m, Quantizer)}
    missing = [
        key
        for key in checkpointer.incompatible.missing_keys
        if not any(key.startswith(f"{q}.") for q in quantizer_names)
    ]
    if missing:
        raise ValueError(
            f"--weights {path}: does not fit the model of this config ({len(missing)} of its weights are missing "
            f"or of another shape, e.g. {', '.join(missing[:4])}): a checkpoint of another architecture?"
        )


def _build_cfg(args):
    import model_quantization.detectron2  # noqa: F401  (registers the shapes splits)

    try:  # AdelaiDet's defaults are detectron2's plus its own: they read both kinds of config
        import adet.modeling  # noqa: F401  (registers AdelaiDet's meta-architectures)
        from adet.config import get_cfg
    except ImportError:
        from detectron2.config import get_cfg
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(args.opts) + ["MODEL.WEIGHTS", args.weights])
    cfg.freeze()
    return cfg


def _evaluate(cfg, model: nn.Module) -> dict[str, float]:
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    name = cfg.DATASETS.TEST[0]
    evaluator = COCOEvaluator(name, tasks=("bbox",), distributed=False)
    return inference_on_dataset(model, build_detection_test_loader(cfg, name), evaluator)["bbox"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_quantization.calibrate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )  # fmt: skip
    parser.add_argument("--config-file", required=True, help="a quantized config (e.g. *_ptq_w8a8.yaml)")
    parser.add_argument("--weights", required=True, help="the float detector's checkpoint")
    parser.add_argument(
        "--images", type=int, default=DEFAULT_IMAGES, help=f"calibration images ({DEFAULT_IMAGES})"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="which images of DATASETS.TRAIN (a random subset)"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="checkpoint (default: OUTPUT_DIR/model_calibrated.pth)"
    )
    parser.add_argument(
        "--no-eval", action="store_true", help="skip the AP of the float and calibrated models"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="model_quantization")
    setup_logger(name="detectron2", configure_stdout=False)
    try:
        cfg = _build_cfg(args)
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model

        model = build_model(cfg)
        if not cfg.MODEL.QUANTIZATION.ENABLED:
            raise ValueError(
                f"--config-file {args.config_file}: a float config (MODEL.QUANTIZATION.ENABLED is False); "
                f"calibrate a quantized one, e.g. configs/*/shapes/*_ptq_w8a8.yaml"
            )
        load_float_weights(model, args.weights)
        report = calibrate_detector(cfg, model, args.images, args.seed)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    logger.info("%s", report)
    output = args.output or Path(cfg.OUTPUT_DIR) / "model_calibrated.pth"
    output.parent.mkdir(parents=True, exist_ok=True)
    DetectionCheckpointer(model, save_dir=str(output.parent)).save(output.stem)
    logger.info("wrote %s", output)
    if not args.no_eval:
        calibrated = _evaluate(cfg, model)
        float_cfg = float_config(cfg)
        float_model = build_model(float_cfg)
        DetectionCheckpointer(float_model).load(args.weights)
        reference = _evaluate(float_cfg, float_model)
        print("\n| model | AP | AP50 | AP75 |\n|---|---:|---:|---:|")
        for label, metrics in (("float", reference), (f"calibrated ({args.images} images)", calibrated)):
            print(f"| {label} | {metrics['AP']:.1f} | {metrics['AP50']:.1f} | {metrics['AP75']:.1f} |")
        print(f"\nΔAP {calibrated['AP'] - reference['AP']:+.2f} on {cfg.DATASETS.TEST[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
