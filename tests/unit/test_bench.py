"""The fake-quant benchmark runs every row and renders its tables (tiny tensor; speed is not tested here)."""

from __future__ import annotations

import os

import pytest
import torch

from bench import fake_quant
from model_quantization.quantizers import QUANTIZERS


def test_benchmark_covers_every_quantizer_and_renders_markdown():
    shape = (2, 4, 8, 8)
    rows = fake_quant.run(shape=shape, threads=1, iters=1, repeats=1)
    names = [r.name for r in rows]
    assert names[:5] == ["relu", "torch native", "lsq naive", "lsq fused", "lsq eager"]
    assert {n.split(" (")[0] for n in names[5:]} == set(QUANTIZERS.names())
    assert rows[0].ratio_to_relu == 1.0 and all(r.ns_per_elem > 0 for r in rows)
    markdown = fake_quant.to_markdown(rows, shape, threads=1)
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # header + one line per row
    assert "LSQ target (fused fwd+bwd <= 2x ReLU)" in markdown
    assert "Every quantizer fwd+bwd <= 2x ReLU" in markdown  # issue 15: every registered method, judged
    assert "2x4x8x8" in markdown
    assert fake_quant.format_table(rows).count("\n") >= len(rows) + 2


def test_a_benchmark_taken_on_a_busy_machine_is_flagged():
    """Real processes keep the cores busy: the check flags it; without them, a quiet machine is not."""
    import subprocess
    import sys

    from bench import _load

    with _load.LoadCheck() as quiet:
        pass
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        with _load.LoadCheck() as busy:
            pass
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert busy.busy_before is not None and busy.busy_before > 0.5, (
        busy.line()
    )  # one spinning process per core
    assert busy.busy and "BUSY" in busy.line() and "measure again on an idle machine" in busy.line()
    # the quiet check ran while only pytest (asleep in busy_share) was running, unless CI shares the cores
    assert quiet.busy_before is not None and quiet.busy_before < busy.busy_before
    rows = fake_quant.run((2, 4, 8, 8), torch.get_num_threads(), 4, 1, 1, False, "min", "cpu", None)
    assert fake_quant.format_table(rows, busy).startswith(busy.line())


def test_the_fake_quant_benchmark_steadies_glibcs_heap():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert fake_quant.steady_heap() is True
