"""The low-bit recipe study: each QAT option measured on its own, then the recipe, over 3 seeds and on a
held-out dataset (``python -m demo.study``).

Every row is a QAT fine-tune of the same float model (trained once per dataset from scratch, seed 0, the
demo's float config) and is compared with the *like-for-like* float model: the float model fine-tuned by
exactly the same schedule with quantization off, with the same seed. A row's ΔAP is the mean ± sample std
over the seeds of (its AP - that float fine-tune's AP); a row whose schedule trains longer (progressive
bit widths: 4-bit first) is compared with a float fine-tune of the same total length.

Parts:
  ablation  RetinaNet R-18 at 4 and 2 bits: the baseline (the recipe before this study), each option
            switched on alone, and the best two together (``ABLATIONS``); tuned on ``shapes``.
  recipe    RetinaNet and FCOS R-18 at 4, 3 and 2 bits with the demo's recipe (the ``*_mixed`` configs).
  float     only the float models every other part starts from.

``--dataset heldout`` runs a part on the held-out generator configuration (``shapes_heldout_*``), which
nothing was tuned on. Every run is cached by its config hash, so an interrupted study resumes, and results
go to ``output/study/<dataset>/``: ``<part>.json`` and ``<part>.md``.
"""

from __future__ import annotations

from .threads import default_thread_settings

default_thread_settings()  # before torch is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from .plan import MODELS, PROGRESSIVE, ROOT, Mode, Variant, variants  # noqa: E402
from .report import lineage  # noqa: E402
from .run import PhaseResult, run_variant, setup_logging  # noqa: E402

logger = logging.getLogger("demo")

DATASETS = {
    "shapes": ("shapes_train", "shapes_val"),
    "heldout": ("shapes_heldout_train", "shapes_heldout_val"),
}

#: The recipe before this study (PR #6's ``*_mixed`` configs): LSQ, 8-bit stem/predictors/sums, 200
#: iterations at the float peak LR, steps initialised by the paper's mean|x| estimate from one batch.
#: Spelled out so that the ablation means the same whatever the configs' defaults become.
SCHEDULE = (
    "SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.MAX_ITER", 200, "SOLVER.STEPS", (150,),
    "SOLVER.WARMUP_ITERS", 20, "SOLVER.BASE_LR", 0.01,
)  # fmt: skip
BASELINE = (
    *SCHEDULE,
    "MODEL.QUANTIZATION.WEIGHT.OPTIONS", {"INIT_METHOD": "mean_abs"},
    "MODEL.QUANTIZATION.ACTIVATION.OPTIONS", {"INIT_METHOD": "mean_abs"},
    "MODEL.QUANTIZATION.DISTILLATION.ENABLED", False, "MODEL.QUANTIZATION.FREEZE_BN_AFTER", 0.0,
    "TEST.PRECISE_BN.ENABLED", False,
)  # fmt: skip

#: One option at a time on top of the baseline: name -> (description, overrides, start from the 4-bit run).
ABLATIONS: dict[str, tuple[str, tuple, bool]] = {
    "baseline": ("the recipe before this study", (), False),
    "kd": ("+ distillation from the float teacher (logits, boxes)", ("MODEL.QUANTIZATION.DISTILLATION.ENABLED", True), False),
    "kd_feature": ("+ distillation incl. FPN features", ("MODEL.QUANTIZATION.DISTILLATION.ENABLED", True, "MODEL.QUANTIZATION.DISTILLATION.FEATURE_WEIGHT", 1.0), False),
    "init_mse": ("+ MSE-calibrated step initialisation (4 batches)", ("MODEL.QUANTIZATION.WEIGHT.OPTIONS", {"INIT_METHOD": "mse"}, "MODEL.QUANTIZATION.ACTIVATION.OPTIONS", {"INIT_METHOD": "mse", "INIT_BATCHES": 4}), False),
    "init_percentile": ("+ percentile activation step initialisation (99.99, 4 batches)", ("MODEL.QUANTIZATION.ACTIVATION.OPTIONS", {"INIT_METHOD": "percentile", "INIT_BATCHES": 4}), False),
    "freeze_bn": ("+ BN statistics frozen for the last 25%", ("MODEL.QUANTIZATION.FREEZE_BN_AFTER", 0.75), False),
    "precise_bn": ("+ BN statistics re-estimated after QAT (50 batches)", ("TEST.PRECISE_BN.ENABLED", True, "TEST.PRECISE_BN.NUM_ITER", 50), False),
    "progressive": ("+ progressive: from the 4-bit QAT run (2-bit only)", ("MODEL.QUANTIZATION.REINIT_QUANTIZERS", True), True),
    # The two options that helped most alone (3 seeds, 4 and 2 bits), together: the recipe candidate.
    "kd_init_mse": ("+ distillation and MSE step initialisation together", ("MODEL.QUANTIZATION.DISTILLATION.ENABLED", True, "MODEL.QUANTIZATION.WEIGHT.OPTIONS", {"INIT_METHOD": "mse"}, "MODEL.QUANTIZATION.ACTIVATION.OPTIONS", {"INIT_METHOD": "mse", "INIT_BATCHES": 4}), False),
    # The fine-tune's learning rate (SOLVER.* overrides; the like-for-like float row uses them too). The
    # baseline's 0.01 was chosen against an unconverged float (the float's peak LR, README); from a converged
    # float the same schedule lowered the float itself by 1.5 AP.
    "kd_lr002": ("+ distillation, fine-tune LR 0.002", ("MODEL.QUANTIZATION.DISTILLATION.ENABLED", True, "SOLVER.BASE_LR", 0.002), False),
    "kd_lr004": ("+ distillation, fine-tune LR 0.004", ("MODEL.QUANTIZATION.DISTILLATION.ENABLED", True, "SOLVER.BASE_LR", 0.004), False),
    # A longer fine-tune (the published 2-bit results fine-tune for a whole schedule).
    "kd_800it": ("+ distillation, 800 iterations", ("MODEL.QUANTIZATION.DISTILLATION.ENABLED", True, "SOLVER.MAX_ITER", 800, "SOLVER.STEPS", (600,)), False),
    # Not a recipe option: the baseline trained through torch.compile, to see that it reaches the eager AP.
    "compiled": ("the baseline, compiled (MODEL.QUANTIZATION.COMPILE)", ("MODEL.QUANTIZATION.COMPILE", True), False),
}  # fmt: skip

PARTS = ("ablation", "recipe", "float")


#: ``--quick``: a smoke run of the study's machinery (numbers mean nothing).
QUICK: dict[str, int | None] = {"float_iters": None, "quant_iters": None}


def _mode(dataset: str, seed: int) -> Mode:
    train, test = DATASETS[dataset]
    return Mode(f"study-{dataset}", "shapes", QUICK["float_iters"], QUICK["quant_iters"], test, "cpu",
                train_dataset=train, seed=seed)  # fmt: skip


def _float_run(model: str, dataset: str, root: Path) -> PhaseResult:
    """The float model every row of `model` starts from: the demo's float config, seed 0, cached."""
    base = variants(_mode(dataset, 0), [model], bits=(), ptq=())[0]
    return run_variant(base, _mode(dataset, 0), root / "float", None, deploy=False)


def _link_parent(parent: PhaseResult, source_root: Path, target_root: Path) -> None:
    """Make `parent`'s run visible under `target_root` (run_variant finds weights under its own root)."""
    target = target_root / "runs" / parent.key
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to((source_root / "runs" / parent.key).resolve())


def _schedule(opts: tuple) -> tuple:
    """The ``SOLVER.*`` pairs of a row's overrides: the like-for-like float row trains with them too."""
    pairs = zip(opts[::2], opts[1::2], strict=True)
    return tuple(item for key, value in pairs if key.startswith("SOLVER.") for item in (key, value))


def _rows(
    part: str, model: str, bits: int, only: list[str] | None = None
) -> list[tuple[str, str, Variant, str | None, int, tuple]]:
    """(row name, description, variant, key of the run it starts from, QAT iterations before it, the row's
    own ``SOLVER.*`` overrides).

    `only` keeps the ablation rows of those names (all by default), in ``ABLATIONS``' order.
    """
    if part == "recipe":  # the demo's own row, chained as in the demo (progressive bit widths)
        target = _recipe_plan(model)[f"{model}/lsq_w{bits}a{bits}"]
        description = "the demo's recipe (*_mixed configs)" + (
            f"; from the {PROGRESSIVE[bits]}-bit row" if target.teacher else ""
        )
        return [("recipe", description, target, target.parent, 0, ())]
    qat = variants(_mode("shapes", 0), [model], bits=(bits,), ptq=(), progressive={})
    target = next(v for v in qat if v.key == f"{model}/lsq_w{bits}a{bits}")
    rows = []
    for name, (description, opts, progressive) in ABLATIONS.items():
        if (progressive and bits == 4) or (only is not None and name not in only):
            continue
        variant = dataclasses.replace(target, key=f"{model}/{name}_w{bits}a{bits}", opts=(*BASELINE, *opts))
        parent = f"{model}/baseline_w4a4" if progressive else f"{model}/float"
        rows.append((name, description, variant, parent, 200 if progressive else 0, _schedule(opts)))
    return rows


def _recipe_plan(model: str, extra_opts: tuple = ()) -> dict[str, Variant]:
    """The demo's QAT rows and like-for-like float rows of `model` by key (every bit width, so that a
    progressive row's chain is there whatever ``--bits`` asks for); `extra_opts` (``merge_from_list``
    pairs) go to every quantized row, not to the float ones."""
    plan = variants(_mode("shapes", 0), [model], ptq=())
    return {v.key: dataclasses.replace(v, opts=(*v.opts, *extra_opts)) if v.quantized else v for v in plan}


def _run_chain(
    key: str, plan: dict[str, Variant], mode: Mode, root: Path, results: dict[str, PhaseResult], deploy: bool
) -> PhaseResult:
    """Run (or take from the cache) the row `key` of `plan` after the rows it starts from and is taught
    by; `results` holds the runs so far (the float model's at least) and gains this one."""
    if key not in results:
        variant = plan[key]
        parent = _run_chain(variant.parent, plan, mode, root, results, deploy=False)
        teacher = _run_chain(variant.teacher, plan, mode, root, results, False) if variant.teacher else None
        results[key] = run_variant(
            variant, mode, root, parent, cache_quantized=True, deploy=deploy, teacher=teacher
        )
    return results[key]


def _float_finetune(model: str, total_iters: int, schedule: tuple = ()) -> Variant:
    """The like-for-like float row of an ablation row: the baseline's schedule, `total_iters` long, with
    the row's `schedule` overrides, quantization off."""
    reference = variants(_mode("shapes", 0), [model], bits=(4,), ptq=())[1]
    steps = (round(total_iters * 0.75),)
    suffix = "".join(
        f"_{key.split('.')[-1].lower()}{value}"
        for key, value in zip(schedule[::2], schedule[1::2], strict=True)
        if key not in ("SOLVER.MAX_ITER", "SOLVER.STEPS")  # the length is in the key; steps follow from it
    )
    return dataclasses.replace(
        reference,
        key=f"{model}/float_finetuned_{total_iters}{suffix}",
        opts=(*reference.opts, *SCHEDULE, *schedule, "SOLVER.MAX_ITER", total_iters, "SOLVER.STEPS", steps),
    )


def run_part(
    part: str,
    dataset: str,
    seeds: list[int],
    models: list[str],
    bits: list[int],
    root: Path,
    rows: list[str] | None = None,
    onnx: bool = False,
    extra_opts: tuple = (),
) -> dict:
    """Run (or take from the cache) every run of `part`; returns {model: {bits: {row: stats}}}.

    With `onnx`, every quantized run is also exported to integer ONNX and evaluated in ONNX Runtime (the
    demo's ONNX AP column, gate 3), cached runs included; ``onnx_AP`` lists it per seed (and
    ``onnx_kernels`` the kernels the export chose). `extra_opts` are config overrides of the recipe's
    quantized rows (e.g. ``MODEL.QUANTIZATION.INTEGER_BIAS True``); they are part of each run's hash.
    """
    summary: dict = {}
    for model in models:
        float_result = _float_run(model, dataset, root)
        logger.info(f"[study] {model} float ({dataset}): AP {float_result.AP:.1f}")
        if part == "float":  # just the float models (every other part starts from them)
            summary[model] = {"float": {"float": {"AP": [float_result.AP]}}}
            continue
        for b in bits:
            for name, description, variant, parent_key, before, schedule in _rows(part, model, b, rows):
                deltas, aps, references, onnx_aps, kernels = [], [], [], [], []
                for seed in seeds:
                    mode = _mode(dataset, seed)
                    seed_root = root / f"seed{seed}"
                    _link_parent(float_result, root / "float", seed_root)
                    results = {f"{model}/float": float_result}
                    if part == "recipe":  # the demo's rows, chained as the demo chains them
                        plan = _recipe_plan(model, extra_opts)
                        result = _run_chain(variant.key, plan, mode, seed_root, results, deploy=onnx)
                        reference = _run_chain(
                            variant.reference, plan, mode, seed_root, results, deploy=False
                        )
                        length = sum(run.iterations for run in lineage(result, results)[1:])
                    else:
                        if parent_key != f"{model}/float":  # progressive: the 4-bit baseline run first
                            four = _rows("ablation", model, 4)[0][2]
                            results[parent_key] = run_variant(
                                four, mode, seed_root, float_result, cache_quantized=True, deploy=False
                            )
                        result = run_variant(
                            variant, mode, seed_root, results[parent_key], cache_quantized=True, deploy=onnx
                        )
                        length = before + result.iterations
                        reference = run_variant(
                            _float_finetune(model, length, schedule),
                            mode,
                            seed_root,
                            float_result,
                            deploy=False,
                        )
                    deltas.append(result.AP - reference.AP)
                    aps.append(result.AP)
                    references.append(reference.AP)
                    onnx_aps.append(result.onnx_AP)
                    kernels.append(result.onnx_kernels)
                    logger.info(
                        f"[study] {dataset} {model} {b}-bit {name} seed {seed}: AP {result.AP:.1f} "
                        f"(float fine-tuned {length} it: {reference.AP:.1f}, ΔAP {result.AP - reference.AP:+.1f})"
                    )
                summary.setdefault(model, {}).setdefault(str(b), {})[name] = {
                    "description": description,
                    "AP": aps,
                    "float_finetuned_AP": references,
                    "delta": deltas,
                    "delta_mean": statistics.mean(deltas),
                    "delta_std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
                    "float_AP": float_result.AP,
                    "onnx_AP": onnx_aps if onnx else None,
                    "onnx_kernels": kernels if onnx else None,
                }
    return summary


def markdown(summary: dict, part: str, dataset: str, seeds: list[int]) -> str:
    """One table: model, bits, row, mean AP, like-for-like float AP, ΔAP mean ± std (and, where the runs
    were exported, ONNX Runtime AP minus PyTorch AP per seed)."""
    with_onnx = any(
        s.get("onnx_AP") for by_bits in summary.values() for rows in by_bits.values() for s in rows.values()
    )
    lines = [
        f"{part} on `{DATASETS[dataset][1]}` (trained on `{DATASETS[dataset][0]}`), seeds {seeds}: mean ± std "
        f"of ΔAP against the float model fine-tuned by the same schedule, same seed.",
        "",
        "| model | bits | variant | AP | float fine-tuned AP | ΔAP |"
        + (" ONNX - PyTorch AP |" if with_onnx else ""),
        "|---|---:|---|---:|---:|---:|" + ("---:|" if with_onnx else ""),
    ]
    for model, by_bits in summary.items():
        for b, rows in by_bits.items():
            for name, s in rows.items():
                onnx = ""
                if with_onnx:
                    kernels = s.get("onnx_kernels") or [None] * len(s["AP"])
                    cells = zip(s.get("onnx_AP") or [], s["AP"], kernels, strict=False)
                    onnx = (
                        " "
                        + ", ".join(
                            "-" if o is None else f"{o - a:+.2f}" + (f" ({k})" if k else "")
                            for o, a, k in cells
                        )
                        + " |"
                    )
                lines.append(
                    f"| {MODELS[model].model} | {b}/{b} | {name}: {s['description']} | {statistics.mean(s['AP']):.1f} "
                    f"| {statistics.mean(s['float_finetuned_AP']):.1f} | {s['delta_mean']:+.1f} ± {s['delta_std']:.1f} |"
                    + onnx
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=PARTS)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="shapes")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--models", default=None, help="default: retinanet for the ablation, both for the recipe"
    )
    parser.add_argument("--bits", default=None, help="default: 4,2 for the ablation, 4,3,2 for the recipe")
    parser.add_argument(
        "--rows",
        default=None,
        help=f"ablation rows to run, comma-separated (default: all of {', '.join(ABLATIONS)})",
    )
    parser.add_argument(
        "--onnx", action="store_true", help="also export every quantized run and evaluate it in ONNX Runtime"
    )
    parser.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="recipe only: config overrides of every quantized row, e.g. MODEL.QUANTIZATION.INTEGER_BIAS True",
    )
    parser.add_argument("--output-dir", type=Path, default=ROOT / "output" / "study")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 float and 4 QAT iterations")
    args = parser.parse_args(argv)
    if args.quick:
        QUICK.update(float_iters=20, quant_iters=4)
    seeds = [int(s) for s in args.seeds.split(",")]
    models = (args.models or ("retinanet" if args.part == "ablation" else "retinanet,fcos")).split(",")
    bits = [int(b) for b in (args.bits or ("4,2" if args.part == "ablation" else "4,3,2")).split(",")]
    rows = None if args.rows is None else args.rows.split(",")
    if args.opts and (args.part != "recipe" or len(args.opts) % 2):
        parser.error("--opts: KEY VALUE pairs, for the recipe part only")
    unknown = sorted(set(rows or ()) - set(ABLATIONS))
    if unknown:
        parser.error(f"--rows: unknown ablation rows {unknown}; choose from {', '.join(ABLATIONS)}")
    root = (args.output_dir / args.dataset).resolve()
    root.mkdir(parents=True, exist_ok=True)
    setup_logging(root / "log.txt", "[%(asctime)s] %(message)s", ("demo",))
    import model_quantization.detectron2  # noqa: F401  (registers the shapes splits)

    start = time.perf_counter()
    summary = run_part(args.part, args.dataset, seeds, models, bits, root, rows, args.onnx, tuple(args.opts))
    table = "" if args.part == "float" else markdown(summary, args.part, args.dataset, seeds)
    (root / f"{args.part}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (root / f"{args.part}.md").write_text(table)
    print("\n" + table)
    logger.info(f"[study] {args.part} on {args.dataset} done in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
