"""Parameter storage at quantized bit widths, and the demo's table/plot writers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from demo.report import lineage, markdown_table, plot_ap_vs_bits, plot_loss_curves, write_table
from demo.run import PhaseResult
from model_quantization import QuantSpec, convert
from model_quantization.footprint import parameter_bits, parameter_megabytes


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 8, 1),
        nn.Flatten(),
        nn.LazyLinear(4),
    )


def _quantize(model: nn.Module, bits: int, rules=()) -> nn.Module:
    model(torch.randn(1, 3, 6, 6))  # materialise the lazy layer
    spec = QuantSpec.from_dict({
        "weight": {"method": "lsq", "bits": bits},
        "activation": {"method": "lsq", "bits": bits, "signed": True},
        "rules": list(rules),
    })  # fmt: skip
    return convert(model, spec).model


def test_float_model_counts_every_parameter_at_32_bits():
    model = _model()
    model(torch.randn(1, 3, 6, 6))
    total = sum(p.numel() for p in model.parameters())
    assert set(parameter_bits(model).values()) == {32}
    assert parameter_megabytes(model) == pytest.approx(total * 4 / 1e6)


def test_quantized_weights_count_at_their_bits_and_everything_else_at_32():
    model = _quantize(_model(), 4, rules=[{"pattern": "5", "weight": {"bits": 8}}])
    bits = parameter_bits(model)
    assert bits["0.weight"] == 4 and bits["3.weight"] == 4 and bits["5.weight"] == 8
    # biases, BN affine parameters and quantizer steps stay float
    assert bits["3.bias"] == bits["1.weight"] == 32
    assert all(v == 32 for k, v in bits.items() if "quantizer" in k)
    expected = sum(p.numel() * bits[n] for n, p in model.named_parameters()) / 8 / 1e6
    assert parameter_megabytes(model) == pytest.approx(expected)
    assert parameter_megabytes(model) < parameter_megabytes(_quantize(_model(), 8))


def test_weights_left_float_by_a_rule_count_at_32_bits():
    model = _quantize(_model(), 2, rules=[{"pattern": "0", "skip": True}])
    assert parameter_bits(model)["0.weight"] == 32


def _result(model: str, bits: int, ap: float, cached: bool = False, parent: str | None = None) -> PhaseResult:
    label = "float" if bits == 32 else f"{bits}/{bits}"
    return PhaseResult(
        key=f"{model}/{label}", model=model, bits=label, weight_bits=bits, activation_bits=bits,
        iterations=100, AP=ap, AP50=ap + 10, AP75=ap - 5, seconds_per_iter=0.2, train_seconds=20.0,
        eval_seconds=3.0, size_mb=bits / 4, config_hash="abc", parent=parent, cached=cached,
    )  # fmt: skip


def test_table_compares_quantized_rows_with_the_like_for_like_float_run(tmp_path):
    rows = [
        _result("A", 32, 20.0, cached=True), _result("A", 4, 19.5, parent="A/float"),
        _result("B", 32, 10.0), _result("B", 32, 11.0, parent="B/float"), _result("B", 2, 12.5, parent="B/float"),
    ]  # fmt: skip
    table = markdown_table(rows).splitlines()
    assert table[0].startswith("| model | bits W/A | AP |")
    assert len(table) == 2 + len(rows)
    # A has no fine-tuned float row: against the float run; B: against its fine-tuned float run
    assert "| -0.5 |" in table[3] and "| +1.5 |" in table[6]
    assert "| 100 (cached) |" in table[2] and "| 100 + 100 |" in table[3]
    md, js = write_table(rows, tmp_path, {"mode": "quick"})
    data = json.loads(js.read_text())
    assert data["mode"] == "quick" and [r["AP"] for r in data["rows"]] == [20.0, 19.5, 10.0, 11.0, 12.5]
    assert md.read_text() == markdown_table(rows)


def test_ptq_rows_compare_with_the_float_model_they_were_calibrated_from():
    ptq = PhaseResult(**{**_result("B", 8, 10.8, parent="B/float").to_json(), "key": "B/ptq_w8a8",
                         "kind": "calibrate", "iterations": 0, "bits": "8/8 (PTQ)"})  # fmt: skip
    finetuned = PhaseResult(
        **{**_result("B", 32, 13.0, parent="B/float").to_json(), "key": "B/float_finetuned"}
    )
    rows = [_result("B", 32, 11.0), finetuned, _result("B", 4, 12.5, parent="B/float"), ptq]
    table = markdown_table(rows).splitlines()
    # QAT: against the fine-tuned float row (like for like); PTQ: against the float row (no training either)
    assert "| -0.5 |" in table[4] and "| -0.2 |" in table[5]
    assert "| 100 + no training |" in table[5] and "| - |" in table[5]


def test_the_table_shows_the_onnx_model_and_footnotes_a_refused_export():
    exported = PhaseResult(
        **{**_result("A", 4, 19.5, parent="A/float").to_json(), "onnx_AP": 19.4, "onnx_mb": 1.25}
    )
    refused = PhaseResult(
        **{
            **_result("A", 2, 15.0, parent="A/float").to_json(),
            "key": "A/2",
            "onnx_error": "'x': no integer form",
        }
    )
    table = markdown_table([_result("A", 32, 20.0), exported, refused]).splitlines()
    assert table[0].endswith("| size MB | ONNX AP | ONNX MB |")
    assert table[2].endswith("| 8.00 | - | - |")  # not exported
    assert table[3].endswith("| 1.00 | 19.4 | 1.25 |") and table[4].endswith("| 0.50 | refused | - |")
    assert table[-1] == "- A 2/2: ONNX export refused: 'x': no integer form"


def test_plots_are_written_as_png(tmp_path):
    rows = [
        _result("A", 32, 20.0),
        _result("A", 4, 19.5, parent="A/float"),
        _result("A", 2, 15.0, parent="A/float"),
        PhaseResult(
            **{**_result("A", 8, 19.9, parent="A/float").to_json(), "key": "A/ptq", "kind": "calibrate"}
        ),
    ]
    run = tmp_path / "runs" / "A" / "float"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(
        "\n".join(json.dumps({"iteration": i, "total_loss": 2.0 / (i + 1)}) for i in range(0, 100, 10))
    )
    for path in (
        plot_ap_vs_bits(rows, tmp_path / "ap.png", "val"),
        plot_loss_curves(rows, tmp_path / "runs", tmp_path / "loss.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_a_progressive_row_is_compared_with_the_float_fine_tuned_as_often():
    """2 bits from the 4-bit row: ΔAP against the float fine-tuned twice (its `reference`), the other QAT
    rows against the float fine-tuned once; the iterations column shows the whole chain."""
    float_row = _result("B", 32, 11.0)
    once = PhaseResult(**{**_result("B", 32, 13.0, parent="B/float").to_json(), "key": "B/float_finetuned"})
    twice = PhaseResult(
        **{**_result("B", 32, 14.0, parent="B/float_finetuned").to_json(), "key": "B/float_finetuned_2x"}
    )
    four = PhaseResult(
        **{**_result("B", 4, 13.5, parent="B/float").to_json(), "reference": "B/float_finetuned"}
    )
    two = PhaseResult(
        **{**_result("B", 2, 12.0, parent="B/4/4").to_json(), "reference": "B/float_finetuned_2x"}
    )
    rows = [float_row, once, twice, four, two]
    assert [r.key for r in lineage(two, {r.key: r for r in rows})] == ["B/float", "B/4/4", "B/2/2"]
    table = markdown_table(rows).splitlines()
    assert "| +0.5 | 100 + 100 |" in table[5] and "| -2.0 | 100 + 100 + 100 |" in table[6]
    assert "| 100 + 100 + 100 |" in table[4]  # the float fine-tuned twice
    # without its reference row in the table, a row falls back to the float fine-tuned once
    assert "| -1.0 |" in markdown_table([float_row, once, four, two]).splitlines()[5]


def test_the_demo_plan_chains_2_bits_from_4_bits_and_adds_the_float_fine_tuned_twice():
    from demo.plan import MODES, variants

    plan = {v.key: v for v in variants(MODES["default"], ["fcos"])}
    two = plan["fcos/lsq_w2a2"]
    assert (two.parent, two.teacher, two.reference) == (
        "fcos/lsq_w4a4",
        "fcos/float",
        "fcos/float_finetuned_2x",
    )
    assert two.opts == ("MODEL.QUANTIZATION.REINIT_QUANTIZERS", True)
    assert plan["fcos/float_finetuned_2x"].parent == "fcos/float_finetuned"
    assert plan["fcos/lsq_w4a4"].reference == "fcos/float_finetuned" and plan["fcos/lsq_w4a4"].teacher is None
    keys = list(plan)
    assert keys.index("fcos/lsq_w4a4") < keys.index("fcos/lsq_w2a2")  # a chain runs after its start
    # without the 4-bit row (or with progressive off), 2 bits start from the float model as before
    for alone in (
        variants(MODES["default"], ["fcos"], bits=(2,)),
        variants(MODES["default"], ["fcos"], progressive={}),
    ):
        direct = {v.key: v for v in alone}
        assert direct["fcos/lsq_w2a2"].parent == "fcos/float" and "fcos/float_finetuned_2x" not in direct
