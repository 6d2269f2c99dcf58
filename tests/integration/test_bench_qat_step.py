"""bench/qat_step.py runs both variants in their own processes and reports ratios (speed is not tested)."""

from __future__ import annotations

import pytest

from bench import qat_step

pytestmark = pytest.mark.integration


def test_qat_step_benchmark_measures_float_and_lsq(patched_tree) -> None:
    results = qat_step.run(iters=1, warmup=1, rounds=1)
    assert set(results) == {"float", "lsq w4a4"}
    for row in results.values():
        assert row["sec_per_iter"] > 0 and row["peak_mb"] > 0
    assert results["lsq w4a4"]["params"] > results["float"]["params"], "LSQ adds step-size parameters"
    table = qat_step.to_markdown(results, threads=2, batch=2, iters=1, rounds=1)
    assert table.count("\n| ") == 3 and "Targets: time <= 1.2x" in table
