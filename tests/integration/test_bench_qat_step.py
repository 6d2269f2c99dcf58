"""bench/qat_step.py runs each variant in its own process and reports ratios and targets (speed is not
tested; the compiled variants are exercised by tests/integration/test_compile.py, and compiling the whole
detector with Inductor takes minutes, so they are not run here)."""

from __future__ import annotations

import pytest

from bench import qat_step

pytestmark = pytest.mark.integration


def test_qat_step_benchmark_measures_float_and_lsq(patched_tree) -> None:
    results = qat_step.run(
        iters=1, warmup=1, rounds=1, batches=(2,), sizes=(64,), variants=("float", "lsq w4a4"), threads=1
    )
    assert set(results) == {(64, 2)}
    table = results[(64, 2)]
    assert set(table) == {"float", "lsq w4a4"}
    for row in table.values():
        assert row["sec_per_iter"] > 0 and row["peak_mb"] > 0
        assert row["compile_s"] is None and row["compiled"] == []
        assert row["freed_memory_kept"], (
            "the build hook keeps freed memory on CPU (model_quantization.allocator)"
        )
    assert table["lsq w4a4"]["params"] > table["float"]["params"], "LSQ adds step-size parameters"
    # The compiled rows and their verdicts, rendered from a stand-in measurement.
    results[(64, 2)]["lsq w4a4 compiled"] = {
        **table["lsq w4a4"],
        "compile_s": 120.0,
        "compile_warm_s": 20.0,
        "compiled": ["backbone", "head"],
    }
    markdown = qat_step.to_markdown(results, threads=1, iters=1, rounds=1)
    assert markdown.count("\n| 64 | 2 |") == 3
    assert "1 CPU threads, glibc keeps freed memory," in markdown
    assert "| 120 / 20 |" in markdown
    assert (
        "compiled QAT time <= 1.0x float eager:" in markdown
        and "<= 1.15x float compiled: not measured" in markdown
    )
    assert "QAT peak memory <= 1.3x float eager" in markdown
