"""``python -m demo`` (what ``nox -s demo`` runs): float vs LSQ 4/3/2-bit and PTQ detectors.

Trains a float RetinaNet R-18 and FCOS R-18 on the embedded shapes dataset, fine-tunes LSQ 4-, 3- and
2-bit versions of each from the float weights, calibrates 8/8 and 4/8 post-training-quantized versions,
evaluates all with COCOEvaluator and writes, under the output directory: ``results.md`` /
``results.json`` (the table), ``ap_vs_bits.png``, ``loss_curves.png``, ``log.txt`` (detectron2's full log)
and ``runs/<model>/<variant>/`` (weights, metrics, config).
"""

from __future__ import annotations

from .threads import default_thread_settings

default_thread_settings()  # before torch is imported: OpenMP reads its settings when it loads

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from .plan import MODELS, MODES, ROOT, Mode, Variant, variants  # noqa: E402
from .report import markdown_table, plot_ap_vs_bits, plot_loss_curves, write_table  # noqa: E402
from .run import PhaseResult, build_cfg, run_variant, setup_logging  # noqa: E402

logger = logging.getLogger("demo")

#: Seconds per iteration assumed before a phase of the kind has been measured (2 CPU cores, 128 px):
#: float training, and QAT relative to float.
PRIOR_FLOAT_SECONDS_PER_ITER = 0.2
PRIOR_QAT_OVER_FLOAT = 1.3
PRIOR_EVAL_SECONDS = 8.0
PRIOR_CALIBRATION_SECONDS = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nox -s demo --", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_const",
        dest="mode",
        const="quick",
        help="smoke run, under 3 minutes on 2 CPU cores (numbers are not meaningful)",
    )
    size.add_argument(
        "--full",
        action="store_const",
        dest="mode",
        const="full",
        help="the COCO recipes of configs/*/coco (needs a GPU and COCO under $DETECTRON2_DATASETS)",
    )
    parser.set_defaults(mode="default")
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where results go (default: output/demo/<mode>)"
    )
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated subset of {','.join(MODELS)} (default: all)",
    )
    parser.add_argument(
        "--retrain-float",
        action="store_true",
        help="train the float models again even when a run with the same config hash is cached",
    )
    parser.add_argument(
        "--ptq-only",
        action="store_true",
        help="only the float and post-training-quantized rows (no QAT fine-tunes): what PTQ gives in minutes",
    )
    parser.add_argument(
        "--skip-onnx",
        action="store_true",
        help="leave out the ONNX AP / ONNX MB columns (each row's integer ONNX export and its evaluation)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="detectron2's SEED for every run (default 0: the README's table)"
    )
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(f"--models: unknown {unknown or 'empty list'}; choose from {', '.join(MODELS)}")
    if args.output_dir is not None:
        problem = _unwritable(args.output_dir)
        if problem:
            parser.error(f"--output-dir {args.output_dir}: {problem}")
    return args


def _unwritable(path: Path) -> str | None:
    """Why results cannot be written under `path` (None when they can); creates nothing."""
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        return "exists and is not a directory"
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"cannot write in {existing} ({exc.strerror or exc})"
    return None


def _setup_logging(output_dir: Path) -> None:
    """detectron2's full log goes to ``log.txt``; the console gets the demo's phase lines and
    detectron2's periodic training lines."""
    setup_logging(
        output_dir / "log.txt", "[%(asctime)s %(name)s] %(message)s", ("demo", "detectron2.utils.events")
    )


def _clock(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """The one-line-per-phase progress with an ETA from the speeds measured so far."""

    def __init__(self, plan: list[Variant], mode: Mode, iterations: dict[str, int]) -> None:
        self.plan = plan
        self.mode = mode
        self.iterations = iterations
        self.start = time.perf_counter()
        self.float_speed = PRIOR_FLOAT_SECONDS_PER_ITER
        self.qat_speed = PRIOR_FLOAT_SECONDS_PER_ITER * PRIOR_QAT_OVER_FLOAT
        self.eval_seconds = PRIOR_EVAL_SECONDS
        self.qat_measured = False

    def _estimate(self, variant: Variant) -> float:
        if variant.kind == "calibrate":
            return PRIOR_CALIBRATION_SECONDS + self.eval_seconds
        speed = self.qat_speed if variant.quantized else self.float_speed
        return self.iterations[variant.key] * speed + self.eval_seconds

    def begin(self, index: int, variant: Variant) -> None:
        elapsed = time.perf_counter() - self.start
        remaining = sum(self._estimate(v) for v in self.plan[index:])
        if variant.kind == "calibrate":
            what, length = f"calibrate from {variant.parent}", "no training"
        else:
            what = "train from scratch" if variant.from_scratch else f"fine-tune from {variant.parent}"
            length = f"{self.iterations[variant.key]} it"
        eta = f", ETA {_clock(remaining)}" if self.mode.family == "shapes" else ""
        logger.info(f"[demo {index + 1}/{len(self.plan)}] {variant.model} {variant.bits_label}: {what} "
                    f"({length}) | elapsed {_clock(elapsed)}{eta}")  # fmt: skip

    def done(self, variant: Variant, result: PhaseResult) -> None:
        if result.cached:
            logger.info(f"    reused the cached run ({result.config_hash}): AP {result.AP:.1f}")
            return
        if variant.kind == "calibrate":
            pass
        elif not variant.quantized:
            self.float_speed = result.seconds_per_iter
            if not self.qat_measured:
                self.qat_speed = result.seconds_per_iter * PRIOR_QAT_OVER_FLOAT
        else:
            self.qat_speed = result.seconds_per_iter
            self.qat_measured = True
        self.eval_seconds = result.eval_seconds
        logger.info(f"    AP {result.AP:.1f} (AP50 {result.AP50:.1f}), {result.seconds_per_iter:.3f} s/iter, "
                    f"train {_clock(result.train_seconds)}, eval {_clock(result.eval_seconds)}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = dataclasses.replace(MODES[args.mode], seed=args.seed)
    plan = variants(mode, args.models, bits=() if args.ptq_only else (4, 3, 2))
    output_dir = (args.output_dir or ROOT / "output" / "demo" / mode.name).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(output_dir)

    import model_quantization.detectron2  # noqa: F401  (registers the shapes splits)

    if mode.family == "coco":
        _check_full_inputs(plan, mode)
    iterations = {v.key: build_cfg(v, mode, None, output_dir).SOLVER.MAX_ITER for v in plan}
    progress = Progress(plan, mode, iterations)
    logger.info(f"demo ({mode.name}, seed {mode.seed}): {len(plan)} runs; results in {output_dir}")
    results: dict[str, PhaseResult] = {}
    for index, variant in enumerate(plan):
        progress.begin(index, variant)
        parent = results[variant.parent] if variant.parent else None
        result = run_variant(
            variant,
            mode,
            output_dir,
            parent,
            reuse=not args.retrain_float,
            deploy=not args.skip_onnx and mode.exports(variant),
            teacher=results[variant.teacher] if variant.teacher else None,
        )
        results[variant.key] = result
        progress.done(variant, result)

    rows = list(results.values())
    wall = time.perf_counter() - progress.start
    dataset = ", ".join(build_cfg(plan[0], mode, None, output_dir).DATASETS.TEST)
    md, js = write_table(rows, output_dir, {"mode": mode.name, "wall_seconds": round(wall, 1),
                                            "test_dataset": dataset, "seed": mode.seed})  # fmt: skip
    plot_ap_vs_bits(rows, output_dir / "ap_vs_bits.png", dataset)
    plot_loss_curves(rows, output_dir / "runs", output_dir / "loss_curves.png")
    print("\n" + markdown_table(rows))
    logger.info(
        f"done in {_clock(wall)}: {md.name}, {js.name}, ap_vs_bits.png, loss_curves.png in {output_dir}"
    )
    return 0


def _check_full_inputs(plan: list[Variant], mode: Mode) -> None:
    """``--full`` reads COCO from detectron2's dataset root and ImageNet backbone weights from the float
    configs' ``MODEL.WEIGHTS``; fail before training, naming every missing file."""
    import os

    root = Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    missing = [
        f"{path} (COCO 2017; set DETECTRON2_DATASETS to the folder holding coco/, see detectron2's "
        "datasets/README.md)"
        for path in (root / "coco" / "annotations" / "instances_train2017.json", root / "coco" / "train2017")
        if not path.exists()
    ]
    for variant in plan:
        if not variant.from_scratch:
            continue
        weights = build_cfg(variant, mode, None, Path("unused")).MODEL.WEIGHTS
        if weights and "://" not in weights and not Path(weights).exists():
            missing.append(f"{weights} (MODEL.WEIGHTS of {variant.config}: the ImageNet R-18 backbone)")
    if missing:
        raise SystemExit("--full cannot start; missing:\n  " + "\n  ".join(missing))


if __name__ == "__main__":
    sys.exit(main())
