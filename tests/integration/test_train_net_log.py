"""Upstream's own tools/train_net.py (detectron2's and AdelaiDet's, unchanged) writes what the quantization
package logs into OUTPUT_DIR/log.txt and the console: the conversion report and the one-line quantizer
initialisation summary (issue 13, item 11)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .d2_helpers import ADET_CONFIG_DIR, CONFIG_DIR, ROOT

pytestmark = pytest.mark.integration

TINY = [
    "MODEL.WEIGHTS", "",
    "MODEL.DEVICE", "cpu",
    "DATASETS.TRAIN", "('shapes_tiny_train',)",
    "DATASETS.TEST", "('shapes_tiny_val',)",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "3",  # upstream's metric printer needs an iteration time: 3 iterations at least
    "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.CHECKPOINT_PERIOD", "100",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.EVAL_PERIOD", "0",
]  # fmt: skip


def _train_net(upstream: str, config: Path, output: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "external" / upstream / "tools/train_net.py"), "--config-file", str(config),
         *TINY, "OUTPUT_DIR", str(output)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize(
    "upstream, config, arch, quantizers",
    [
        ("detectron2", CONFIG_DIR / "shapes/retinanet_R_18_FPN_fullbn_lsq_w4a4.yaml", "RetinaNet", 78),
        (
            "AdelaiDet",
            ADET_CONFIG_DIR / "shapes/fcos_R_18_FPN_fullbn_lsq_w4a4.yaml",
            "OneStageDetector",
            None,
        ),
    ],
    ids=["detectron2", "AdelaiDet"],
)
def test_train_net_logs_the_conversion_report_and_the_init_summary(
    patched_tree, tmp_path: Path, upstream: str, config: Path, arch: str, quantizers: int | None
) -> None:
    proc = _train_net(upstream, config, tmp_path)
    log = (tmp_path / "log.txt").read_text()
    console = proc.stdout + proc.stderr
    for text in (log, console):
        assert f"Quantized {arch} as MODEL.QUANTIZATION says:" in text
        assert "Quantized modules (" in text and "Left in float (" in text
        assert "backbone.bottom_up.res2.0.conv1" in text  # a row of the report
    summary = [line for line in log.splitlines() if "quantizers:" in line and "initialised from data" in line]
    assert len(summary) == 1, summary  # one line per run, not one per iteration
    match = re.search(
        r"quantizers: (\d+) of (\d+) initialised from data at iteration 0 \(lsq: (\d+)\)", summary[0]
    )
    assert match, summary[0]
    assert match[1] == match[2] == match[3]
    if quantizers is not None:
        assert int(match[1]) == quantizers
