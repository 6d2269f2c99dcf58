"""Importing the package needs torch only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import sys
import model_quantization
import model_quantization.functional, model_quantization.quantizers, model_quantization.nn
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torchvision", "detectron2", "adelaidet", "cv2", "pycocotools"})
assert not heavy, heavy
assert not any(m.startswith("model_quantization.detectron2") for m in sys.modules)
print(len(model_quantization.QUANTIZERS))
"""


def test_import_needs_torch_only():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "8"
