"""The README's "Adding a method" example works as written: one module, one options dataclass, one
decorator, and the method is built, validated and states its grid like the built-in ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import sys, torch
text = open(sys.argv[1]).read()
exec(text.split("**Adding a method**")[1].split("```python")[1].split("```")[0])
from model_quantization.quantizers import QUANTIZERS, QuantizerRecipe, build_quantizer
assert QUANTIZERS.get("fixed_clip").method == "fixed_clip"
q = build_quantizer(QuantizerRecipe("fixed_clip", 4, False, options={"clip": 6.0}))
out = q(torch.rand(1000) * 8)
grid = q.integer_grid()
assert out.unique().numel() <= 16 and torch.equal(grid.dequantize(grid.codes(out)), out)
try:
    QuantizerRecipe("fixed_clip", 4, False, options={"clip": True}).validate("activation")
except ValueError as exc:
    assert "options.clip: must be a number, got True" in str(exc)
else:
    raise AssertionError("a boolean clip was accepted")
print("ok")
"""


def test_the_readme_example_registers_a_working_method():
    # A subprocess: registering a method is global, and the other tests check the registry's contents.
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, str(ROOT / "README.md")], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
