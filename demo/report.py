"""The demo's outputs: the result table (Markdown, JSON) and the plots (AP vs bits, loss curves)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from model_quantization.footprint import FLOAT_BITS

from .run import PhaseResult

__all__ = [
    "lineage",
    "markdown_table",
    "plot_ap_vs_bits",
    "plot_loss_curves",
    "read_loss_curve",
    "write_table",
]

COLUMNS = (
    "model", "bits W/A", "AP", "AP50", "AP75", "ΔAP", "iterations", "s/iter", "size MB", "ONNX AP", "ONNX MB",
)  # fmt: skip
#: Right-aligned (numeric) columns.
NUMERIC = {"AP", "AP50", "AP75", "ΔAP", "iterations", "s/iter", "size MB", "ONNX AP", "ONNX MB"}


def lineage(result: PhaseResult, by_key: dict[str, PhaseResult]) -> list[PhaseResult]:
    """`result` and the runs it starts from, the earliest first (as far back as `by_key` has them):
    ``[float, lsq_w4a4, lsq_w2a2]`` for a 2-bit row fine-tuned from the 4-bit one."""
    chain = [result]
    while chain[-1].parent in by_key and by_key[chain[-1].parent] not in chain:
        chain.append(by_key[chain[-1].parent])
    return chain[::-1]


def _fine_tunes(result: PhaseResult, by_key: dict[str, PhaseResult]) -> int:
    """How many fine-tunes produced `result` from a model trained from scratch (0: trained from scratch)."""
    return 0 if result.parent is None else max(1, len(lineage(result, by_key)) - 1)


def reference_ap(results: list[PhaseResult]) -> dict[str, float]:
    """Per row key, the AP a quantized row is compared with. A QAT row: its ``reference`` row when the
    table has it (the float model fine-tuned as often as the row was: like for like), else the float
    model fine-tuned once with the QAT schedule when the table has that row, else the float model. A PTQ
    row: the float model it was calibrated from (no training on either side)."""
    by_key = {r.key: r for r in results}
    float_ap: dict[str, float] = {}
    for r in results:  # the float model, replaced by its first fine-tune (not by one fine-tuned twice)
        if r.weight_bits == FLOAT_BITS and (r.model not in float_ap or _fine_tunes(r, by_key) == 1):
            float_ap[r.model] = r.AP
    reference = {}
    for r in results:
        if r.weight_bits == FLOAT_BITS:
            continue
        if r.kind == "calibrate" and r.parent in by_key:
            reference[r.key] = by_key[r.parent].AP
        elif r.reference in by_key:
            reference[r.key] = by_key[r.reference].AP
        elif r.model in float_ap:
            reference[r.key] = float_ap[r.model]
    return reference


def _rows(results: list[PhaseResult]) -> list[list[str]]:
    reference = reference_ap(results)
    by_key = {r.key: r for r in results}
    rows = []
    for r in results:
        delta = f"{r.AP - reference[r.key]:+.1f}" if r.key in reference else ""
        # fine-tunes show the iterations of the runs they start from, too: "4000 + 800 + 800"
        chain = [str(run.iterations) for run in lineage(r, by_key)]
        iterations = " + ".join(chain[:-1] + ["no training"] if r.kind == "calibrate" else chain)
        iterations += " (cached)" if r.cached else ""
        speed = "-" if r.kind == "calibrate" else f"{r.seconds_per_iter:.3f}"
        rows.append(
            [
                r.model, r.bits, f"{r.AP:.1f}", f"{r.AP50:.1f}", f"{r.AP75:.1f}", delta, iterations, speed,
                f"{r.size_mb:.2f}", *_onnx_cells(r),
            ]
        )  # fmt: skip
    return rows


def _onnx_cells(r: PhaseResult) -> tuple[str, str]:
    """The exported model's AP and file size; "refused" (the reason is a footnote) or "-" (not exported)."""
    if r.onnx_AP is not None:
        return f"{r.onnx_AP:.1f}", f"{r.onnx_mb:.2f}"
    return ("refused", "-") if r.onnx_error else ("-", "-")


def markdown_table(results: list[PhaseResult]) -> str:
    """GitHub Markdown table; ΔAP is against :func:`reference_ap`; export refusals as footnotes."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---:" if c in NUMERIC else "---" for c in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    refusals = [f"- {r.model} {r.bits}: ONNX export refused: {r.onnx_error}" for r in results if r.onnx_error]
    refusals += [
        f"- {r.model} {r.bits}: ONNX AP with exact integer kernels (ConvInteger, float biases): the fused "
        f"kernels failed gate 2 on the parity images"
        for r in results
        if r.onnx_kernels == "exact"
    ]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(refusals) + "\n" if refusals else "")


def write_table(results: list[PhaseResult], output_dir: Path, extra: dict | None = None) -> tuple[Path, Path]:
    """Write ``results.md`` and ``results.json`` (rows plus `extra`, e.g. mode and wall time)."""
    md = output_dir / "results.md"
    js = output_dir / "results.json"
    md.write_text(markdown_table(results))
    js.write_text(json.dumps({**(extra or {}), "rows": [r.to_json() for r in results]}, indent=2) + "\n")
    return md, js


def read_loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(iteration, total_loss) pairs from a run's ``metrics.json`` (one JSON object per line)."""
    iterations, losses = [], []
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        return iterations, losses
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "total_loss" in record:
            iterations.append(int(record["iteration"]) + 1)
            losses.append(float(record["total_loss"]))
    return iterations, losses


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_ap_vs_bits(results: list[PhaseResult], path: Path, dataset: str) -> Path:
    """AP against weight/activation bits, one line per model, the float AP as a dashed reference."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    models = list(dict.fromkeys(r.model for r in results))
    by_key = {r.key: r for r in results}
    for index, model in enumerate(models):
        color = f"C{index}"
        rows = [r for r in results if r.model == model]
        quantized = sorted(
            (r for r in rows if r.weight_bits != FLOAT_BITS and r.kind != "calibrate"),
            key=lambda r: r.weight_bits,
        )
        ax.plot([r.weight_bits for r in quantized], [r.AP for r in quantized], "o-", color=color,
                label=f"{model} LSQ")  # fmt: skip
        calibrated = [r for r in rows if r.kind == "calibrate"]
        if calibrated:
            ax.plot([r.weight_bits for r in calibrated], [r.AP for r in calibrated], "s", color=color,
                    fillstyle="none", label=f"{model} PTQ (W bits, 8-bit A)")  # fmt: skip
        for r in rows:
            if r.weight_bits == FLOAT_BITS:
                times = _fine_tunes(r, by_key)
                style, what = (
                    (":", "float")
                    if not times
                    else ("--" if times == 1 else "-.", "float, fine-tuned" + f" {times}x" * (times > 1))
                )
                ax.axhline(r.AP, color=color, linestyle=style, label=f"{model} {what} ({r.AP:.1f})")
    ax.set_xlabel("bits (weights / activations)")
    ax.set_ylabel(f"box AP ({dataset})")
    ax.set_xticks(sorted({r.weight_bits for r in results if r.weight_bits != FLOAT_BITS}))
    # from the nearest 5 AP below the lowest point, not from 0: rows a few AP apart stay distinguishable
    lowest = min((r.AP for r in results if math.isfinite(r.AP)), default=0.0)
    ax.set_ylim(bottom=max(0.0, 5 * math.floor((lowest - 2) / 5)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(
        "Accuracy vs bit width (the AP axis does not start at 0)" if lowest > 7 else "Accuracy vs bit width"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss_curves(results: list[PhaseResult], runs_dir: Path, path: Path) -> Path:
    """Training loss per model: the float run, then each fine-tune continuing from its last iteration."""
    plt = _pyplot()
    models = list(dict.fromkeys(r.model for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    by_key = {r.key: r for r in results}
    for ax, model in zip(axes[0], models, strict=True):
        rows = [r for r in results if r.model == model]
        for index, r in enumerate(rows):
            iterations, losses = read_loss_curve(runs_dir / r.key)
            if not iterations:  # a PTQ row (no training): nothing to draw, so no legend entry either
                continue
            shift = sum(run.iterations for run in lineage(r, by_key)[:-1])
            ax.plot([i + shift for i in iterations], losses, color=f"C{index}", label=r.bits, linewidth=1.2)
        ax.set_title(model)
        ax.set_xlabel("iteration (a fine-tune starts where the run it starts from ended)")
        ax.set_ylabel("total loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
