"""Produce and evaluate one demo variant with detectron2's trainer; cache runs by config hash."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from model_quantization.footprint import parameter_megabytes

from .plan import ROOT, Mode, Variant

__all__ = [
    "CACHE_VERSION",
    "PhaseResult",
    "RunFailed",
    "build_cfg",
    "config_hash",
    "run_variant",
    "setup_logging",
]

logger = logging.getLogger("demo")

#: Bump when the way a run is produced changes in a way its config does not show.
CACHE_VERSION = 3
#: Config keys added after runs were cached, with their defaults: at its default such a key changes nothing,
#: so it is left out of the hash and the runs cached before it existed stay valid (set, it is hashed).
LATER_KEYS = {"MODEL.QUANTIZATION.INTEGER_BIAS": False, "MODEL.QUANTIZATION.OUTPUT_QUANTIZERS": []}
METRICS = ("AP", "AP50", "AP75")


@dataclass
class PhaseResult:
    """What one variant measured. Written as ``result.json`` next to its weights.

    ``iterations`` is 0 for a calibrated (PTQ) row; its ``train_seconds`` is the calibration time.
    ``onnx_AP`` / ``onnx_mb``: box AP of the exported integer ONNX model run by ONNX Runtime (same test
    mapper, upstream post-processing) and the ONNX file's size; ``onnx_error`` says why a row has none;
    ``onnx_kernels``: the integer kernels the export chose (``fused``, or ``exact`` where the fused ones
    failed gate 2 on the parity images). ``reference``: key of the float row its ΔAP is taken against
    (None: the table's default, see ``report.reference_ap``).
    """

    key: str
    model: str
    bits: str
    weight_bits: int
    activation_bits: int
    iterations: int
    AP: float
    AP50: float
    AP75: float
    seconds_per_iter: float
    train_seconds: float
    eval_seconds: float
    size_mb: float
    config_hash: str
    parent: str | None = None
    reference: str | None = None
    cached: bool = False
    kind: str = "train"
    seed: int = 0
    onnx_AP: float | None = None
    onnx_mb: float | None = None
    onnx_error: str | None = None
    onnx_kernels: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def build_cfg(
    variant: Variant, mode: Mode, weights: str | None, output_dir: Path, teacher_weights: str | None = None
):
    """The frozen detectron2 config of `variant` under `mode` (AdelaiDet's defaults when it needs them);
    `weights` and `teacher_weights` (the distillation teacher, when not `weights`) are checkpoint paths."""
    if variant.adelaidet:
        import adet.modeling  # noqa: F401  (registers AdelaiDet's meta-architectures)
        from adet.config import get_cfg
    else:
        get_cfg = _detectron2_defaults().clone
    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / variant.config))
    opts = mode.opts(variant)
    if weights is not None:
        opts += ["MODEL.WEIGHTS", weights]
    if teacher_weights is not None:
        opts += ["MODEL.QUANTIZATION.DISTILLATION.TEACHER_WEIGHTS", teacher_weights]
    cfg.merge_from_list(opts + ["OUTPUT_DIR", str(output_dir)])
    cfg.freeze()
    return cfg


@functools.cache
def _detectron2_defaults():
    """detectron2's own default config, even after AdelaiDet was imported: ``adet/config/defaults.py``
    adds its keys to detectron2's global defaults in place, so ``detectron2.config.get_cfg()`` would give a
    RetinaNet row FCOS's keys (and another config hash) in a process that also plans FCOS rows. A fresh
    execution of detectron2's defaults module (patched: our quantization keys included) has none of them."""
    import detectron2.config.defaults as loaded

    spec = importlib.util.spec_from_file_location(
        "detectron2.config._defaults_without_addons", loaded.__file__
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._C


def config_hash(cfg, parent_hash: str = "", extra: str = "") -> str:
    """Hash of everything that determines a run's result: the config (minus where it is written), the
    definition of every shapes split it reads, the hash of the run whose weights it starts from, and
    `extra` (what the config does not say, e.g. a PTQ row's number of calibration images)."""
    from detectron2.data import MetadataCatalog

    clone = cfg.clone()
    clone.defrost()
    clone.OUTPUT_DIR = ""
    for key, default in LATER_KEYS.items():
        *path, leaf = key.split(".")
        node = functools.reduce(getattr, path, clone)
        if leaf in node and node[leaf] == default:
            del node[leaf]
    datasets = [*clone.DATASETS.TRAIN, *clone.DATASETS.TEST]
    specs = [repr(MetadataCatalog.get(name).get("shapes_spec", name)) for name in datasets]
    payload = json.dumps([CACHE_VERSION, clone.dump(), specs, parent_hash, extra])
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _trainer_class(adelaidet: bool, write_period: int, print_period: int):
    from detectron2.engine import DefaultTrainer, hooks
    from detectron2.evaluation import COCOEvaluator
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter

    class DemoTrainer(DefaultTrainer):
        """detectron2's DefaultTrainer (AdelaiDet's train loader for AdelaiDet models) with the demo's
        hooks: timing, LR schedule, PreciseBN after the last iteration when ``TEST.PRECISE_BN`` says so
        (BN statistics re-estimated on training batches), ``metrics.json`` every `write_period`
        iterations (the loss curves) and a console line every `print_period`; checkpointing and
        evaluation happen once, after training."""

        def build_hooks(self):
            metrics = os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")
            precise_bn = []
            if self.cfg.TEST.PRECISE_BN.ENABLED:
                loader_cfg = self.cfg.clone()
                loader_cfg.defrost()
                loader_cfg.DATALOADER.NUM_WORKERS = 0
                loader = self.build_train_loader(loader_cfg)
                precise_bn = [hooks.PreciseBN(0, self.model, loader, self.cfg.TEST.PRECISE_BN.NUM_ITER)]
            return [
                hooks.IterationTimer(),
                hooks.LRScheduler(),
                *precise_bn,
                hooks.PeriodicWriter([JSONWriter(metrics, window_size=write_period)], period=write_period),
                hooks.PeriodicWriter([CommonMetricPrinter(self.max_iter)], period=print_period),
            ]

        @classmethod
        def build_train_loader(cls, cfg):
            if not adelaidet:
                return super().build_train_loader(cfg)
            from adet.data.dataset_mapper import DatasetMapperWithBasis
            from detectron2.data import build_detection_train_loader

            return build_detection_train_loader(cfg, mapper=DatasetMapperWithBasis(cfg, True))

        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return COCOEvaluator(dataset_name, tasks=("bbox",), distributed=False, output_dir=output_folder)

    return DemoTrainer


def box_metrics(bbox: dict, what: str) -> dict[str, float]:
    """AP, AP50, AP75 of COCOEvaluator's ``bbox`` results; a model that detected nothing scores 0, not NaN.

    detectron2's COCOEvaluator reports NaN for every metric when the model made no prediction at all
    ("No predictions from the model!"), and a NaN would turn a study's mean and the table's ΔAP into NaN.
    COCO's AP of an empty detection set is 0 (nothing recalled); the collapse is logged as a warning naming
    `what`.
    """
    metrics = {k: float(bbox[k]) for k in METRICS}
    if all(math.isnan(v) for v in metrics.values()):
        logger.warning(
            f"    {what}: no detections above the score threshold on the test set; AP counted as 0"
        )
        return {k: 0.0 for k in METRICS}
    return metrics


def _evaluate(trainer_class, cfg, model) -> tuple[dict, float]:
    start = time.perf_counter()
    bbox = trainer_class.test(cfg, model)["bbox"]
    return box_metrics(bbox, cfg.OUTPUT_DIR), time.perf_counter() - start


def _seed(cfg) -> None:
    """detectron2's SEED, as ``default_setup`` applies it in ``train_net.py``: initial weights, the
    sampler's data order and augmentation (data-loader workers derive their seeds from it) repeat."""
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)


def _train(variant: Variant, cfg, trainer_class) -> dict:
    from detectron2.checkpoint import DetectionCheckpointer

    _seed(cfg)
    trainer = trainer_class(cfg)
    trainer.resume_or_load(resume=False)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    # The first iterations include data-loader start-up and (QAT) step initialisation.
    times = trainer.storage.history("time").values()
    steady = [t for t, _ in times[min(5, len(times) - 1) :]]
    DetectionCheckpointer(trainer.model, save_dir=cfg.OUTPUT_DIR).save("model_final")
    metrics, eval_seconds = _evaluate(trainer_class, cfg, trainer.model)
    return {
        **metrics,
        "iterations": cfg.SOLVER.MAX_ITER,
        "seconds_per_iter": statistics.median(steady) if steady else float("nan"),
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "size_mb": parameter_megabytes(trainer.model),
    }


def _calibrate(cfg, trainer_class, num_images: int | None) -> dict:
    """Post-training quantization: calibrate the parent's float weights, save, evaluate."""
    from detectron2.checkpoint import DetectionCheckpointer

    from model_quantization.calibrate import calibrate_detector, load_float_weights

    _seed(cfg)
    model = trainer_class.build_model(cfg)
    load_float_weights(model, cfg.MODEL.WEIGHTS)
    start = time.perf_counter()
    report = calibrate_detector(cfg, model, num_images=num_images, seed=cfg.SEED)
    calibrate_seconds = time.perf_counter() - start
    logger.info(f"    {report}")
    DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).save("model_final")
    metrics, eval_seconds = _evaluate(trainer_class, cfg, model)
    return {
        **metrics,
        "iterations": 0,
        "seconds_per_iter": 0.0,
        "train_seconds": calibrate_seconds,
        "eval_seconds": eval_seconds,
        "size_mb": parameter_megabytes(model),
    }


def run_variant(
    variant: Variant,
    mode: Mode,
    output_root: Path,
    parent: PhaseResult | None,
    reuse: bool = True,
    cache_quantized: bool = False,
    deploy: bool = True,
    write_period: int = 10,
    print_period: int = 50,
    teacher: PhaseResult | None = None,
) -> PhaseResult:
    """Produce and evaluate `variant`; returns its row.

    Runs are cached under ``<output_root>/cache/<key>-<config hash>``: float runs always, quantized ones
    with ``cache_quantized`` (the study, which re-runs many variants). A later run whose config (and
    parent run) hashes the same reuses the weights and the row instead of producing them again (unless
    ``reuse`` is False). Every variant's run (``config.yaml``, ``metrics.json``, weights, ``result.json``)
    ends up in ``<output_root>/runs/<key>``; `parent` is the result of the run whose weights it starts from.
    With ``deploy``, the trained weights are also exported to ``model.onnx`` (integer ONNX) and that file
    is evaluated in ONNX Runtime (:func:`_deploy`). `teacher`: the run whose weights teach this one under
    distillation when they are not `parent`'s (``Variant.teacher``).

    A row that is not cached is produced in a new process (:func:`_in_fresh_process`): its result does not
    depend on what this process ran before. Raises :class:`RunFailed` when that process fails.
    """
    run_dir = output_root / "runs" / variant.key
    weights = str(output_root / "runs" / parent.key / "model_final.pth") if parent else None
    teacher_weights = str(output_root / "runs" / teacher.key / "model_final.pth") if teacher else None
    cfg = build_cfg(variant, mode, weights, run_dir, teacher_weights)
    extra = f"calibration images {mode.calibration_images}" if variant.kind == "calibrate" else ""
    if teacher is not None:
        extra += f"teacher {teacher.config_hash}"
    digest = config_hash(cfg, parent.config_hash if parent else "", extra)
    cache_dir = output_root / "cache" / f"{variant.key.replace('/', '-')}-{digest}"
    cached = cache_dir / "result.json"
    cacheable = not variant.quantized or cache_quantized
    if cacheable and reuse and cached.is_file() and (cache_dir / "model_final.pth").is_file():
        if run_dir.resolve() != cache_dir.resolve():
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(cache_dir, run_dir)
        result = PhaseResult(**json.loads(cached.read_text()))
        result.reference = variant.reference  # this plan's reference row (not stored before it existed)
        if deploy and result.onnx_AP is None and result.onnx_error is None:  # cached before the column
            trainer_class = _trainer_class(variant.adelaidet, write_period, print_period)
            _fill_onnx(result, _deploy(cfg, run_dir, trainer_class))
            (cache_dir / "result.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        result.cached = True
        return result

    _in_fresh_process(
        _produce, variant, mode, cfg, digest, run_dir, deploy, write_period, print_period, what=variant.key
    )
    result = PhaseResult(**json.loads((run_dir / "result.json").read_text()))
    if cacheable:
        shutil.rmtree(cache_dir, ignore_errors=True)
        shutil.copytree(run_dir, cache_dir)
    return result


def _produce(
    variant: Variant,
    mode: Mode,
    cfg,
    digest: str,
    run_dir: Path,
    deploy: bool,
    write_period: int,
    print_period: int,
) -> None:
    """Train or calibrate `variant` under `cfg` into `run_dir`, evaluate it (and its ONNX export with
    `deploy`), write ``result.json`` there. Runs in a process of its own (:func:`_in_fresh_process`)."""
    if variant.adelaidet:
        import adet.modeling  # noqa: F401  (registers AdelaiDet's meta-architectures)
    trainer_class = _trainer_class(variant.adelaidet, write_period, print_period)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.dump())
    if variant.kind == "calibrate":
        measured = _calibrate(cfg, trainer_class, mode.calibration_images)
    else:
        measured = _train(variant, cfg, trainer_class)
    result = PhaseResult(
        key=variant.key, model=variant.model, bits=variant.bits_label, weight_bits=variant.weight_bits,
        activation_bits=variant.activation_bits, config_hash=digest, parent=variant.parent, kind=variant.kind,
        reference=variant.reference,
        seed=cfg.SEED, **measured,
    )  # fmt: skip
    if deploy:
        _fill_onnx(result, _deploy(cfg, run_dir, trainer_class))
    (run_dir / "result.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")


class RunFailed(RuntimeError):
    """A row's process failed; its traceback went to stderr and the log."""


def _in_fresh_process(function, *args, what: str) -> None:
    """Call ``function(*args)`` in a new process that has run nothing yet and wait for it.

    Why: a row must come out as if it ran alone, as ``train_net.py`` runs it, whatever the demo or the
    study ran before it. In one process it does not: TorchScript's profiling executor runs a scripted
    function (fvcore's ``sigmoid_focal_loss_jit``, RetinaNet's and FCOS's classification loss) unoptimized
    on its first call and through an optimized graph from then on, process-wide, and that graph's autodiff
    gradients differ in the last bits; a row trained after another one took other gradients from its first
    step, and a 4-bit network turns that into another run (up to 0.57 AP apart here). Its executor has no reset
    (flushing its compilation cache does not restart profiling), so each row gets a new process.

    The process is forked from a server that has imported torch, detectron2, AdelaiDet and this package
    but run nothing (no TorchScript call, no OpenMP thread yet, so forking it is safe): a row starts in
    milliseconds instead of the ~3.5 s of a spawned interpreter's imports. Where there is no fork server
    (Windows), it is spawned. Only the environment and the logging set up with :func:`setup_logging`
    carry over. As with any multiprocessing start method but fork, the new process imports the calling
    script's main module: a script that calls :func:`run_variant` needs ``if __name__ == "__main__":``.
    """
    process = _row_context().Process(target=_child, args=(function, _LOGGING, args), name=f"demo row {what}")
    process.start()
    try:
        process.join()
    finally:
        if process.is_alive():  # interrupted: do not leave the row training on its own
            process.terminate()
            process.join()
    if process.exitcode != 0:
        raise RunFailed(f"{what}: its process exited with status {process.exitcode} (traceback above)")


@functools.cache
def _row_context():
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Imported by the server once; a module that fails to import (AdelaiDet not built) is skipped there.
    context.set_forkserver_preload(["torch", "model_quantization.detectron2", "adet.modeling", __name__])
    return context


def _child(function, logging_setup: tuple | None, args: tuple) -> None:
    if logging_setup is not None:
        setup_logging(*logging_setup)
    import model_quantization.detectron2  # noqa: F401  (registers the shapes splits and the build hook)

    function(*args)


#: How :func:`setup_logging` was last called in this process (a row's process repeats it).
_LOGGING: tuple | None = None


def setup_logging(log_file: Path, console_format: str, console_loggers: tuple[str, ...]) -> None:
    """detectron2's, AdelaiDet's and our full log to `log_file`; `console_loggers` also to stdout."""
    global _LOGGING
    from detectron2.utils.logger import setup_logger

    for name in ("detectron2", "adet", "fvcore", "model_quantization", "d2", "demo"):
        setup_logger(output=str(log_file), name=name, abbrev_name=name, configure_stdout=False)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(console_format, "%H:%M:%S"))
    for name in console_loggers:
        logging.getLogger(name).addHandler(console)
    _LOGGING = (log_file, console_format, console_loggers)


def _fill_onnx(result: PhaseResult, deployed: dict) -> None:
    result.onnx_AP, result.onnx_mb, result.onnx_error, result.onnx_kernels = (
        deployed.get("onnx_AP"),
        deployed.get("onnx_mb"),
        deployed.get("onnx_error"),
        deployed.get("onnx_kernels"),
    )


def _deploy(cfg, run_dir: Path, trainer_class) -> dict:
    """Export the run's ``model_final.pth`` to ``model.onnx`` and evaluate that file in ONNX Runtime.

    The model is rebuilt from the config and its saved weights (what a user deploys), not taken from the
    trainer. An export the exporter refuses (a method without an integer form) is not a crash of the whole
    demo: the row records the refusal, logged as a warning and shown in the table.
    """
    from detectron2.checkpoint import DetectionCheckpointer

    from model_quantization.deploy import ExportError, evaluate_onnx, export_model

    model = trainer_class.build_model(cfg)
    DetectionCheckpointer(model).load(str(run_dir / "model_final.pth"))
    path = run_dir / "model.onnx"
    start = time.perf_counter()
    try:
        # Two parity images: enough for kernels="auto" to see fused kernels that drift (gate 2), a few s.
        report = export_model(cfg, model, path, parity_images=2)
    except ExportError as exc:
        logger.warning(f"    ONNX export refused: {exc}")
        return {"onnx_error": str(exc)}
    for note in report.notes:
        logger.warning(f"    ONNX export: {note}")
    bbox = box_metrics(evaluate_onnx(cfg, path, model=model)["bbox"], f"{path} in ONNX Runtime")
    logger.info(
        f"    ONNX Runtime: AP {bbox['AP']:.1f}, {report.file_bytes / 1e6:.2f} MB, {report.passes.kernels} "
        f"kernels, {report.coverage} ({time.perf_counter() - start:.0f} s)"
    )
    return {
        "onnx_AP": float(bbox["AP"]),
        "onnx_mb": report.file_bytes / 1e6,
        "onnx_kernels": report.passes.kernels,
    }
