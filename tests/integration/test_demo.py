"""`nox -s demo -- --quick` end to end (real training, COCOEvaluator, table, plots), caching, and modes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = (
    "float", "float_finetuned", "float_finetuned_2x", "lsq_w4a4", "lsq_w3a3", "lsq_w2a2", "ptq_w8a8", "ptq_w4a8",
)  # fmt: skip
EXPECTED_KEYS = [f"{model}/{v}" for model in ("retinanet", "fcos") for v in VARIANTS]


def _nox_demo(*args: str) -> subprocess.CompletedProcess:
    """What the README tells a newcomer to run (nox builds first, a no-op once built)."""
    return subprocess.run(
        [sys.executable, "-m", "nox", "-s", "demo", "--", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.fixture(scope="module")
def quick_demo(patched_tree, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    output = tmp_path_factory.mktemp("demo")
    proc = _nox_demo("--quick", "--output-dir", str(output))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return output, proc


def test_quick_demo_writes_a_table_of_real_evaluations(quick_demo):
    output, proc = quick_demo
    data = json.loads((output / "results.json").read_text())
    rows = {row["key"]: row for row in data["rows"]}
    assert list(rows) == EXPECTED_KEYS
    assert data["mode"] == "quick" and data["test_dataset"] == "shapes_quick_val"
    for row in rows.values():
        assert all(math.isfinite(row[k]) and 0 <= row[k] <= 100 for k in ("AP", "AP50", "AP75")), row
        assert row["AP50"] >= row["AP75"], row
        if row["kind"] == "calibrate":  # PTQ: calibrated from the float weights, no training
            assert row["iterations"] == 0 and row["parent"].endswith("/float") and row["train_seconds"] > 0
        else:
            assert row["seconds_per_iter"] > 0 and row["iterations"] == (40 if row["parent"] is None else 10)
        assert row["seed"] == 0
        assert (output / "runs" / row["key"] / "model_final.pth").is_file()
        if row["kind"] == "train":  # the *_mixed recipe distills from the float model
            logged = set().union(*map(json.loads, (output / "runs" / row["key"] / "metrics.json").open()))
            distilled = {"loss_kd_logits", "loss_kd_box"} <= logged
            assert distilled == ("lsq" in row["key"]), (row["key"], sorted(logged))
    for model in ("retinanet", "fcos"):  # progressive: 2 bits from the 4-bit row, compared like for like
        two = rows[f"{model}/lsq_w2a2"]
        assert two["parent"] == f"{model}/lsq_w4a4" and two["reference"] == f"{model}/float_finetuned_2x"
        assert rows[f"{model}/float_finetuned_2x"]["parent"] == f"{model}/float_finetuned"
        config = (output / "runs" / model / "lsq_w2a2" / "config.yaml").read_text()
        teacher = output / "runs" / model / "float" / "model_final.pth"  # not the 4-bit row it starts from
        assert f"TEACHER_WEIGHTS: {teacher}" in config and "REINIT_QUANTIZERS: true" in config
        assert str(output / "runs" / model / "lsq_w4a4" / "model_final.pth") in config  # MODEL.WEIGHTS
    # COCOEvaluator's own numbers (its log table prints them with 3 decimals), nothing computed on the side
    log = (output / "log.txt").read_text()
    # one evaluation of the PyTorch model per row, and one of each exported ONNX file (3 rows per model); a
    # smoke-run model may detect nothing (COCOEvaluator: "No predictions", no table; the demo: AP 0, warned)
    evaluations = log.count("Evaluation results for bbox") + log.count("No predictions from the model!")
    assert evaluations == len(EXPECTED_KEYS) + 6
    logged = [[c.strip() for c in line.split("|")[1:4]] for line in log.splitlines() if line.startswith("|")]
    for row in rows.values():
        if f"{output / 'runs' / row['key']}: no detections above the score threshold" in log:
            assert row["AP"] == row["AP50"] == row["AP75"] == 0.0, row
            continue
        assert [f"{row[k]:.3f}" for k in ("AP", "AP50", "AP75")] in logged, row["key"]
    for model in ("retinanet", "fcos"):
        sizes = [rows[f"{model}/{v}"]["size_mb"] for v in VARIANTS]
        assert sizes[0] == sizes[1] == sizes[2], sizes
        assert sizes[2] > sizes[3] > sizes[4] > sizes[5] and sizes[3] < sizes[0] / 4, sizes
        assert sizes[0] / 4 < sizes[6] < sizes[0] / 3.5 and sizes[7] < sizes[6], sizes  # 8-bit, 4-bit weights
    exported = ("float", "lsq_w4a4", "ptq_w8a8")  # the smoke run exports one row of each kind per model
    for key, row in rows.items():  # ... as an integer ONNX model, evaluated in ONNX Runtime
        if key.split("/")[1] not in exported:
            assert row["onnx_AP"] is None and not (output / "runs" / key / "model.onnx").exists(), row
            continue
        assert row["onnx_error"] is None and 0 <= row["onnx_AP"] <= 100, row
        assert (output / "runs" / key / "model.onnx").stat().st_size == round(row["onnx_mb"] * 1e6)
        assert row["onnx_kernels"] in ("fused", "exact"), row  # kernels="auto" chose by gate 2
    for model in ("retinanet", "fcos"):
        onnx_mb = {v: rows[f"{model}/{v}"]["onnx_mb"] for v in exported}
        # int8 containers: a quarter of the float file (plus scales), for QAT and PTQ alike
        assert onnx_mb["lsq_w4a4"] < onnx_mb["float"] / 3.5 and onnx_mb["ptq_w8a8"] < onnx_mb["float"] / 3.5
        row = rows[f"{model}/float"]  # the float network runs the same math in ONNX Runtime
        assert abs(row["onnx_AP"] - row["AP"]) <= 0.3, row
    table = (output / "results.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(EXPECTED_KEYS)
    exact = [row for row in rows.values() if row["onnx_kernels"] == "exact"]  # each one footnoted
    assert table.count("ONNX AP with exact integer kernels") == len(exact), table
    assert table.splitlines()[0].endswith("| size MB | ONNX AP | ONNX MB |")
    assert (
        "| 2/2 (8-bit stem, predictors, sums; from 4/4) |" in table
        and "| float (fine-tuned like the QAT rows) |" in table
        and "| float (fine-tuned 2x like the QAT rows) |" in table
        and "| 40 + 10 + 10 |" in table
        and "| 8/8 (PTQ, no training) |" in table
    )
    assert table in proc.stdout  # the table is printed, too


def test_quick_demo_reports_progress_per_phase(quick_demo):
    _, proc = quick_demo
    for index in range(1, len(EXPECTED_KEYS) + 1):
        assert f"[demo {index}/{len(EXPECTED_KEYS)}]" in proc.stdout
    assert "ETA" in proc.stdout and "elapsed" in proc.stdout


def test_quick_demo_plots_ap_and_loss_curves(quick_demo):
    output, _ = quick_demo
    import matplotlib.image

    for name in ("ap_vs_bits.png", "loss_curves.png"):
        image = matplotlib.image.imread(output / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0.01, name
    curve = [
        json.loads(line)
        for line in (output / "runs" / "fcos" / "float" / "metrics.json").read_text().splitlines()
    ]
    assert [r["iteration"] for r in curve if "total_loss" in r] == [9, 19, 29, 39]


def test_rerun_reuses_cached_float_runs_unless_told_not_to(quick_demo):
    output, _ = quick_demo
    first = {r["key"]: r for r in json.loads((output / "results.json").read_text())["rows"]}
    # --ptq-only: the float row and the two PTQ rows, no QAT fine-tunes (the cheapest re-run with both kinds)
    proc = _nox_demo("--quick", "--output-dir", str(output), "--models", "fcos", "--ptq-only", "--skip-onnx")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = {r["key"]: r for r in json.loads((output / "results.json").read_text())["rows"]}
    assert list(rows) == ["fcos/float", "fcos/ptq_w8a8", "fcos/ptq_w4a8"]
    assert rows["fcos/float"]["cached"] is True  # float runs come from the cache, with their ONNX columns
    for field in ("AP", "config_hash", "onnx_AP"):
        assert rows["fcos/float"][field] == first["fcos/float"][field], field
    assert not rows["fcos/ptq_w8a8"]["cached"] and not rows["fcos/ptq_w4a8"]["cached"]  # quantized: re-run
    assert rows["fcos/ptq_w8a8"]["onnx_AP"] is None  # --skip-onnx
    assert proc.stdout.count("reused the cached run") == 1
    again = _nox_demo(
        "--quick",
        "--output-dir",
        str(output),
        "--models",
        "fcos",
        "--ptq-only",
        "--retrain-float",
        "--skip-onnx",
    )
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert not any(r["cached"] for r in json.loads((output / "results.json").read_text())["rows"])


def test_config_hash_follows_the_config(patched_tree, tmp_path):
    import model_quantization.detectron2  # noqa: F401
    from demo.plan import MODES, variants
    from demo.run import LATER_KEYS, build_cfg, config_hash

    quick = MODES["quick"]
    float_variant = variants(quick, ["retinanet"])[0]
    a = config_hash(build_cfg(float_variant, quick, None, tmp_path / "a"))
    assert a == config_hash(build_cfg(float_variant, quick, None, tmp_path / "b"))  # output dir is not in it
    longer = type(quick)(**{**quick.__dict__, "float_iters": 41})
    assert a != config_hash(build_cfg(float_variant, longer, None, tmp_path / "a"))
    # a key added after runs were cached is hashed only when set: at its default the runs stay valid
    recipe = next(v for v in variants(quick, ["retinanet"]) if v.key.endswith("lsq_w4a4"))
    # the *_mixed configs set both later keys (INTEGER_BIAS, OUTPUT_QUANTIZERS): at their defaults here
    qat = dataclasses.replace(
        recipe, opts=(*recipe.opts, *(item for pair in LATER_KEYS.items() for item in pair))
    )
    cfg = build_cfg(qat, quick, None, tmp_path / "a")
    assert config_hash(cfg) != config_hash(build_cfg(recipe, quick, None, tmp_path / "a"))
    before = cfg.clone()
    before.defrost()
    for key in LATER_KEYS:  # the config as it was before the keys existed
        del before.MODEL.QUANTIZATION[key.split(".")[-1]]
    assert config_hash(cfg) == config_hash(before)
    on = build_cfg(
        dataclasses.replace(qat, opts=(*qat.opts, "MODEL.QUANTIZATION.INTEGER_BIAS", True)),
        quick,
        None,
        tmp_path,
    )
    assert config_hash(on) != config_hash(cfg)


_RETINANET_HASH_ALONE = """
import model_quantization.detectron2
from pathlib import Path
from demo.plan import MODES, variants
from demo.run import build_cfg, config_hash
quick = MODES["quick"]
print(config_hash(build_cfg(variants(quick, ["retinanet"])[0], quick, None, Path("x"))))
"""


def test_a_detectron2_rows_hash_does_not_depend_on_adelaidet_being_loaded(patched_tree, tmp_path):
    """AdelaiDet extends detectron2's global default config in place when it is imported: a RetinaNet row
    planned beside FCOS (the default demo) must still hash as in a RetinaNet-only process, or the float
    run cached by `--models retinanet` (or the study) is trained again."""
    import model_quantization.detectron2  # noqa: F401
    from demo.plan import MODES, variants
    from demo.run import build_cfg, config_hash

    quick = MODES["quick"]
    plan = variants(quick, ["retinanet", "fcos"])
    build_cfg(next(v for v in plan if v.adelaidet), quick, None, tmp_path)  # imports AdelaiDet's config
    retinanet = build_cfg(plan[0], quick, None, tmp_path)
    assert "FCOS" not in retinanet.MODEL and "HFLIP_TRAIN" not in retinanet.INPUT
    alone = subprocess.run(
        [sys.executable, "-c", _RETINANET_HASH_ALONE], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert config_hash(retinanet) == alone.stdout.split()[-1]


def test_full_mode_uses_the_coco_recipes_and_says_what_is_missing(patched_tree, tmp_path):
    import model_quantization.detectron2  # noqa: F401
    from demo.plan import MODES, variants
    from demo.run import build_cfg

    full = MODES["full"]
    for variant in variants(full):
        assert "coco" in variant.config.parts, variant
        cfg = build_cfg(variant, full, None, tmp_path)
        assert cfg.DATASETS.TRAIN == ("coco_2017_train",), variant
        assert variant.quantized == cfg.MODEL.QUANTIZATION.ENABLED, variant
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "nowhere")}
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--full", "--output-dir", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "nowhere/coco/annotations/instances_train2017.json" in proc.stderr, proc.stderr[-2000:]


def test_default_mode_runs_the_configs_own_schedule(patched_tree, tmp_path):
    """`nox -s demo` and `train_net.py --config-file <the same config>` train the same schedule."""
    import model_quantization.detectron2  # noqa: F401
    from demo.plan import MODES, ROOT, Mode, variants
    from demo.run import build_cfg

    default = MODES["default"]
    as_configured = Mode("configured", "shapes", None, None, None, None)
    for variant in variants(default):
        ours, theirs = (
            build_cfg(variant, default, None, tmp_path),
            build_cfg(variant, as_configured, None, tmp_path),
        )
        for key in ("MAX_ITER", "STEPS", "WARMUP_ITERS", "BASE_LR"):
            assert ours.SOLVER[key] == theirs.SOLVER[key], (variant.key, key)
        assert (ROOT / variant.config).is_file()


def _usage_error(module: str, *args: str, output: Path) -> str:
    """stderr of ``python -m module args --output-dir output``, which must exit 2 having started nothing."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, "--output-dir", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not any(output.iterdir())  # nothing started
    return proc.stderr


def test_unknown_model_is_a_usage_error_naming_the_choices(tmp_path):
    stderr = _usage_error("demo", "--quick", "--models", "retinanet,yolo", output=tmp_path)
    assert "--models: unknown ['yolo']; choose from retinanet, fcos" in stderr


def test_study_rows_select_ablation_rows_and_refuse_unknown_ones(patched_tree, tmp_path):
    """`python -m demo.study ablation --rows a,b` runs those rows only; an unknown name starts nothing."""
    import model_quantization.detectron2  # noqa: F401
    from demo.study import _rows

    assert [r[0] for r in _rows("ablation", "retinanet", 2, ["progressive", "baseline"])] == [
        "baseline",
        "progressive",
    ]
    assert [r[0] for r in _rows("ablation", "retinanet", 4, ["progressive"])] == []  # 2-bit only
    stderr = _usage_error("demo.study", "ablation", "--rows", "kd,sharpen", output=tmp_path)
    assert "--rows: unknown ablation rows ['sharpen']" in stderr
    for args in (("ablation", "--opts", "SOLVER.BASE_LR", "0.1"), ("recipe", "--opts", "SOLVER.BASE_LR")):
        assert "--opts: KEY VALUE pairs, for the recipe part only" in _usage_error(
            "demo.study", *args, output=tmp_path
        )


def test_a_study_row_that_changes_the_schedule_is_compared_with_a_float_trained_by_that_schedule(
    patched_tree,
):
    """A row's SOLVER.* overrides (e.g. the fine-tune LR) apply to its like-for-like float row too, which gets
    its own run (another cache key): a QAT row is never compared with a float fine-tuned differently."""
    import model_quantization.detectron2  # noqa: F401
    from demo.plan import MODELS
    from demo.study import _float_finetune, _rows

    rows = {r[0]: r for r in _rows("ablation", "retinanet", 4, ["kd", "kd_lr002"])}
    assert rows["kd"][5] == () and rows["kd_lr002"][5] == ("SOLVER.BASE_LR", 0.002)
    plain, slow = (_float_finetune("retinanet", 200, rows[n][5]) for n in ("kd", "kd_lr002"))
    assert plain.key != slow.key and MODELS["retinanet"].name in slow.key
    last = {k: v for k, v in zip(slow.opts[::2], slow.opts[1::2], strict=True)}  # the last value wins
    assert last["SOLVER.BASE_LR"] == 0.002 and last["SOLVER.MAX_ITER"] == 200
    assert rows["kd_lr002"][2].opts[-2:] == ("SOLVER.BASE_LR", 0.002)  # ... as in the QAT row itself


def test_study_table_shows_onnx_minus_pytorch_ap_per_seed_when_exported():
    from demo.study import markdown

    row = {"description": "d", "AP": [40.0, 41.0], "float_finetuned_AP": [43.0, 43.0], "delta_mean": -2.5,
           "delta_std": 0.7}  # fmt: skip
    exported = markdown(
        {"retinanet": {"4": {"kd": {**row, "onnx_AP": [40.25, None]}}}}, "ablation", "shapes", [0, 1]
    )
    assert "| ONNX - PyTorch AP |" in exported and "| -2.5 ± 0.7 | +0.25, - |" in exported
    kernels = {**row, "onnx_AP": [40.25, 41.0], "onnx_kernels": ["fused", "exact"]}
    chosen = markdown({"retinanet": {"4": {"kd": kernels}}}, "recipe", "shapes", [0, 1])
    assert "| -2.5 ± 0.7 | +0.25 (fused), +0.00 (exact) |" in chosen
    plain = markdown({"retinanet": {"4": {"kd": {**row, "onnx_AP": None}}}}, "ablation", "shapes", [0, 1])
    assert "ONNX" not in plain and plain.rstrip().endswith("| -2.5 ± 0.7 |")


def test_a_model_that_detects_nothing_scores_zero_not_nan(patched_tree, caplog):
    """COCOEvaluator on an empty prediction set gives NaN (detectron2: "No predictions from the model!");
    the demo and the study count it as AP 0 and say so (a 2-bit study run collapsed like that), so that a
    mean over seeds and a ΔAP stay numbers."""
    import logging
    import math

    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    import model_quantization.detectron2  # noqa: F401  (registers the shapes splits)
    from demo.run import box_metrics

    evaluator = COCOEvaluator("shapes_tiny_val", tasks=("bbox",), distributed=False)
    evaluator.reset()
    for d in DatasetCatalog.get("shapes_tiny_val")[:3]:
        empty = Instances((d["height"], d["width"]), pred_boxes=Boxes(torch.zeros(0, 4)))
        empty.scores, empty.pred_classes = torch.zeros(0), torch.zeros(0, dtype=torch.long)
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": empty}])
    bbox = evaluator.evaluate()["bbox"]
    assert math.isnan(bbox["AP"])  # detectron2's own answer
    with caplog.at_level(logging.WARNING, logger="demo"):
        assert box_metrics(bbox, "collapsed run") == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    assert "collapsed run: no detections above the score threshold" in caplog.text
    assert box_metrics({"AP": 41.5, "AP50": 60.0, "AP75": 45.0, "APs": math.nan}, "x")["AP"] == 41.5


@pytest.mark.parametrize(
    "where, message",
    [
        ("file", "exists and is not a directory"),
        ("under_a_file", "is not a directory"),
        ("/proc/mq_demo_output", "cannot write in /proc"),
    ],
)
def test_an_unusable_output_dir_is_a_usage_error_before_anything_runs(tmp_path, where, message):
    (tmp_path / "file").write_text("not a directory")
    target = {"file": tmp_path / "file", "under_a_file": tmp_path / "file" / "out"}.get(where, Path(where))
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--quick", "--output-dir", str(target)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--output-dir {target}: " in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


SEEDED_RUN = r"""
import dataclasses, sys
import model_quantization.detectron2
from demo.plan import Mode, variants
from demo.run import run_variant
from pathlib import Path
mode = Mode("repro", "shapes", 3, 2, "shapes_tiny_val", "cpu", train_dataset="shapes_tiny_train", seed=int(sys.argv[2]))
variant = dataclasses.replace(
    variants(mode, ["retinanet"], bits=(), ptq=())[0],
    opts=("SOLVER.IMS_PER_BATCH", 2, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0),  # detections: a finite AP
)
for root in [sys.argv[1], *sys.argv[3:]]:  # further roots: the same row again, in the same process
    print(run_variant(variant, mode, Path(root), None, reuse=False, deploy=False).AP)
"""


def test_a_seeded_run_repeats_bit_for_bit_and_another_seed_does_not(patched_tree, tmp_path):
    """The demo's SEED fixes initial weights, data order and augmentation: the same run in a new process
    (what re-running the demo does) gives the same weights and AP on the CPU; another seed does not."""
    import torch

    def run(root: str, seed: int):
        proc = subprocess.run(
            [sys.executable, "-c", SEEDED_RUN, str(tmp_path / root), str(seed)],
            cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        weights = torch.load(tmp_path / root / "runs/retinanet/float/model_final.pth", weights_only=False)[
            "model"
        ]
        return float(proc.stdout.split()[-1]), weights

    (ap, a), (again, b), (_, other) = run("a", 5), run("b", 5), run("c", 6)
    assert ap == again and math.isfinite(ap)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in a if a[k].is_floating_point())


def test_ptq_only_runs_the_float_and_ptq_rows(patched_tree):
    from demo.__main__ import parse_args
    from demo.plan import MODES, variants

    args = parse_args(["--ptq-only", "--models", "fcos"])
    assert args.ptq_only
    rows = variants(MODES["default"], args.models, bits=())
    assert [v.key for v in rows] == ["fcos/float", "fcos/ptq_w8a8", "fcos/ptq_w4a8"]
    assert [v.parent for v in rows] == [None, "fcos/float", "fcos/float"]


def test_the_study_runs_the_demos_progressive_chain_and_compares_it_like_for_like(patched_tree, tmp_path):
    """`demo.study recipe --bits 2` runs what the demo runs for its 2-bit row: the 4-bit row first, the 2-bit
    row from it (taught by the float model), and compares it with the float fine-tuned twice. `--opts`
    overrides the config of every quantized row of the chain, and of no float row."""
    proc = subprocess.run(
        [sys.executable, "-m", "demo.study", "recipe", "--quick", "--models", "retinanet", "--bits", "2",
         "--seeds", "0", "--output-dir", str(tmp_path), "--opts", "MODEL.QUANTIZATION.INTEGER_BIAS", "True"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = tmp_path / "shapes" / "seed0" / "runs" / "retinanet"
    results = {p.name: json.loads((p / "result.json").read_text()) for p in runs.iterdir() if p.is_dir()}
    assert sorted(results) == ["float", "float_finetuned", "float_finetuned_2x", "lsq_w2a2", "lsq_w4a4"]
    assert results["lsq_w2a2"]["parent"] == "retinanet/lsq_w4a4"
    assert results["float_finetuned_2x"]["parent"] == "retinanet/float_finetuned"
    config = (runs / "lsq_w2a2" / "config.yaml").read_text()
    assert f"TEACHER_WEIGHTS: {runs / 'float' / 'model_final.pth'}" in config
    row = json.loads((tmp_path / "shapes" / "recipe.json").read_text())["retinanet"]["2"]["recipe"]
    assert row["AP"] == [results["lsq_w2a2"]["AP"]]
    assert row["float_finetuned_AP"] == [results["float_finetuned_2x"]["AP"]]  # not the float fine-tuned once
    assert "from the 4-bit row" in row["description"] and "float fine-tuned 8 it" in proc.stdout
    for name in results:
        integer_bias = "INTEGER_BIAS: true" in (runs / name / "config.yaml").read_text()
        assert integer_bias == name.startswith("lsq"), name


def test_a_row_does_not_depend_on_what_the_process_ran_before(patched_tree, tmp_path):
    """The demo and the study run many rows in one process, and a row must come out as if it ran alone
    (as ``train_net.py`` runs it): a cached parent or an earlier seed must not change a row's result.
    It did: TorchScript's profiling executor runs a scripted function (fvcore's ``sigmoid_focal_loss_jit``,
    RetinaNet's and FCOS's classification loss) unoptimized on its first call and through an optimized
    graph, whose autodiff gradients differ in the last bits, from then on, process-wide; so a row trained
    after another one took other gradients from its first step (the demo with cached floats and the study
    printed the same rows up to 0.57 AP apart). The same row twice in one process now gives the same weights."""
    import torch

    proc = subprocess.run(
        [sys.executable, "-c", SEEDED_RUN, str(tmp_path / "a"), "5", str(tmp_path / "b")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = (
        torch.load(tmp_path / root / "runs/retinanet/float/model_final.pth", weights_only=False)["model"]
        for root in ("a", "b")
    )
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differ, f"{len(differ)} of {len(first)} tensors differ, e.g. {differ[:3]}"


def test_a_row_whose_process_fails_raises_run_failed_naming_the_row(patched_tree, capfd):
    """A row's process that dies (here: an exception in it) is an error naming the row, with the
    traceback on stderr, not a silent row without a result."""
    import operator

    from demo.run import RunFailed, _in_fresh_process

    with pytest.raises(RunFailed, match=r"retinanet/lsq_w4a4: its process exited with status 1"):
        _in_fresh_process(operator.truediv, 1, 0, what="retinanet/lsq_w4a4")
    assert "ZeroDivisionError" in capfd.readouterr().err
