"""Quantized AdelaiDet models (FCOS, BlendMask, CondInst) through the patched tree."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .d2_helpers import (
    ADET_CONFIG_DIR,
    assert_resume_is_exact,
    assert_same_as_unpatched,
    build_and_check,
    config_files,
    load_cfg,
    quantizer_state,
)

pytestmark = pytest.mark.integration

SHAPES = ADET_CONFIG_DIR / "shapes"


@pytest.mark.parametrize(
    "path", config_files(ADET_CONFIG_DIR), ids=lambda p: str(p.relative_to(ADET_CONFIG_DIR))
)
def test_every_adelaidet_config_builds_and_leaves_nothing_silently_float(patched_tree, path: Path) -> None:
    cfg, _, quantized = build_and_check(path)
    if quantized is None:
        return
    if cfg.MODEL.META_ARCHITECTURE == "CondInst":
        dynamic = [r for r in quantized.values() if r["type"] == "DynamicConv2d"]
        assert len(dynamic) == cfg.MODEL.CONDINST.MASK_HEAD.NUM_LAYERS, (
            "generated mask-head weights not quantized"
        )


def _train_and_evaluate(tmp_path: Path, config: str, tasks: tuple[str, ...]):
    from adet.data.dataset_mapper import DatasetMapperWithBasis
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator

    class Trainer(DefaultTrainer):  # as AdelaiDet's tools/train_net.py: its mapper adds what its models need
        @classmethod
        def build_train_loader(cls, cfg):
            return build_detection_train_loader(cfg, mapper=DatasetMapperWithBasis(cfg, True))

    cfg = load_cfg(
        SHAPES / config, "SOLVER.MAX_ITER", 3, "SOLVER.WARMUP_ITERS", 0, "OUTPUT_DIR", str(tmp_path)
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    evaluator = COCOEvaluator("shapes_tiny_val", tasks=tasks, output_dir=str(tmp_path / "eval"))
    return trainer, DefaultTrainer.test(cfg, trainer.model, evaluators=[evaluator])


@pytest.mark.parametrize(
    "config, tasks",
    [
        ("fcos_R_18_FPN_fullbn_lsq_w4a4.yaml", ("bbox",)),
        ("blendmask_R_18_FPN_fullbn_lsq_w2a2.yaml", ("bbox", "segm")),
        ("condinst_R_18_FPN_fullbn_lsq_w4a4.yaml", ("bbox", "segm")),
    ],
)
def test_quantized_adelaidet_models_train_and_evaluate_with_coco(
    patched_tree, tmp_path, config, tasks
) -> None:
    trainer, results = _train_and_evaluate(tmp_path, config, tasks)
    assert set(results) == set(tasks)
    for task in tasks:
        assert {"AP", "AP50", "AP75"} <= set(results[task])
        assert all(math.isnan(v) or 0 <= v <= 100 for v in results[task].values())
    state = quantizer_state(trainer.model)
    flags = {k: bool(v) for k, v in state.items() if k.endswith("initialized")}
    # CondInst's mask head only runs on images with positive locations; with 3 iterations it has.
    assert flags and all(flags.values()), [k for k, v in flags.items() if not v]


CONFIG_ORDER = r"""
import sys
first = sys.argv[1]
if first == "adet":
    from adet.config import get_cfg as adet_get_cfg
    from detectron2.config import get_cfg
else:
    from detectron2.config import get_cfg
    from adet.config import get_cfg as adet_get_cfg
for cfg in (get_cfg(), adet_get_cfg()):
    assert cfg.MODEL.QUANTIZATION.ENABLED is False and cfg.MODEL.QUANTIZATION.RULES == []
cfg = adet_get_cfg()
assert "FCOS" in cfg.MODEL
cfg.merge_from_list(["MODEL.QUANTIZATION.ENABLED", True, "MODEL.FCOS.NUM_CLASSES", 4])
print("ok")
"""


@pytest.mark.parametrize("first", ["adet", "detectron2"])
def test_adelaidet_and_detectron2_configs_coexist_in_either_import_order(patched_tree, first: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CONFIG_ORDER, first],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_fcos_resume_restores_every_quantizer_and_the_next_loss(patched_tree, tmp_path: Path) -> None:
    assert_resume_is_exact(tmp_path, SHAPES / "fcos_R_18_FPN_fullbn_lsq_w2a2.yaml")


def test_condinst_generated_weights_switch(patched_tree) -> None:
    from detectron2.modeling import build_model

    config = SHAPES / "condinst_R_18_FPN_fullbn_lsq_w4a4.yaml"
    quantized = build_model(load_cfg(config)).quantization_report.quantized
    assert sum(r.type == "DynamicConv2d" for r in quantized) == 3
    # The config's own rule for dynamic_convs.0 would then contradict the switch's skip: drop it.
    cfg = load_cfg(config, "MODEL.QUANTIZATION.GENERATED_WEIGHTS", False)
    cfg.MODEL.QUANTIZATION.RULES = [r for r in cfg.MODEL.QUANTIZATION.RULES if "dynamic" not in r["PATTERN"]]
    report = build_model(cfg).quantization_report
    assert not any(r.type == "DynamicConv2d" for r in report.quantized)
    skipped = {row.name: row.reason for row in report.left_float if "dynamic_convs" in row.name}
    assert len(skipped) == 3 and all(reason.startswith("skipped by rule") for reason in skipped.values())


@pytest.mark.parametrize("config", ["fcos_R_18_FPN_fullbn_float.yaml", "Base-CondInst-R18-FullBN.yaml"])
def test_quantization_off_is_identical_to_the_unpatched_pins(
    patched_tree, tmp_path: Path, config: str
) -> None:
    assert_same_as_unpatched(tmp_path, SHAPES / config)


@pytest.mark.parametrize(
    "config, heads",
    [
        ("fcos_R_18_FPN_fullbn_lsq_w4a4.yaml", {"proposal_generator"}),
        (
            "blendmask_R_18_FPN_fullbn_lsq_w2a2.yaml",
            {"proposal_generator", "basis_module", "top_layer"},
        ),
        (
            "condinst_R_18_FPN_fullbn_lsq_w4a4.yaml",
            {"proposal_generator", "mask_branch", "mask_head", "controller"},
        ),
    ],
)
def test_scope_backbone_keeps_each_architectures_heads_float(
    patched_tree, config: str, heads: set[str]
) -> None:
    from detectron2.modeling import build_model

    # CondInst's own rule for the mask head would contradict the scope's skip of mask_head: drop rules.
    opts = ["MODEL.QUANTIZATION.SCOPE", "backbone", "MODEL.QUANTIZATION.RULES", []]
    report = build_model(load_cfg(SHAPES / config, *opts)).quantization_report
    quantized_roots = {row.name.split(".")[0] for row in report.quantized}
    assert quantized_roots == {"backbone"}
    float_roots = {
        row.name.split(".")[0] for row in report.left_float if row.reason.startswith("skipped by rule")
    }
    assert heads <= float_roots
    with pytest.raises(ValueError, match="MODEL.QUANTIZATION.SCOPE: unknown scope 'backbnoe'"):
        build_model(load_cfg(SHAPES / config, "MODEL.QUANTIZATION.SCOPE", "backbnoe"))
