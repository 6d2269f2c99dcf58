"""Upstream detectron2's own CPU unit tests, run on the patched tree (the patches must not break them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: Upstream test files that run on a CPU in about a minute and need no downloads or datasets. Recorded in
#: patches/README.md. Left out: tests/data (downloads assets, needs datasets/coco), test_engine.py
#: (default trainer downloads weights), test_coco_evaluation.py (its fast-eval edge cases disagree with
#: pycocotools 2.0.11 on the pin too), export tests (need caffe2/onnx).
DETECTRON2_TESTS = [
    "tests/test_model_zoo.py",
    "tests/config",
    "tests/test_checkpoint.py",
    "tests/test_solver.py",
    "tests/test_scheduler.py",
    "tests/test_registry.py",
    "tests/modeling/test_anchor_generator.py",
    "tests/modeling/test_box2box_transform.py",
    "tests/modeling/test_matcher.py",
    "tests/modeling/test_roi_heads.py",
    "tests/modeling/test_rpn.py",
    "tests/modeling/test_fast_rcnn.py",
    "tests/modeling/test_model_e2e.py",
    "tests/modeling/test_backbone.py",
    "tests/layers/test_nms.py",
    "tests/layers/test_roi_align.py",
    "tests/layers/test_blocks.py",
    "tests/structures",
]


def test_detectron2_upstream_unit_tests_pass_on_patched_tree(patched_tree) -> None:
    repo = ROOT / "external" / "detectron2"
    proc = subprocess.run(
        # -c /dev/null: upstream's tests run with upstream's defaults, not this repository's pytest config.
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            "/dev/null",
            "--rootdir",
            str(repo),
            "-W",
            "ignore",
            *DETECTRON2_TESTS,
        ],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, (
        f"upstream tests failed on the patched tree: {summary}\n{proc.stdout[-6000:]}"
    )
    assert " passed" in summary and "failed" not in summary
