"""Deployment benchmark (issue 11): ONNX Runtime integer vs fp32 latency (gate 5), and the gates of trained
checkpoints (gates 1-4) with ``--models``.

Speed: latency of the exported *network* (normalisation, backbone, FPN, head outputs per level; decoding
and NMS are upstream's Python either way), batch 1, ``--threads`` intra-op threads, median of ``--iters``
runs after ``--warmup``, at each of ``--sizes``, padded to the backbone's size divisibility as detectron2
pads (800 x 1333 runs at 896 x 1408 for RetinaNet's P7). All rows use the same random weights (latency does
not depend on values); quantizers are initialised from one random image, then their steps made distinct as
a trained model's are. Rows:

* ONNX Runtime fp32: the float model (ONNX Runtime fuses its Conv + BN itself);
* ONNX Runtime integer, LSQ 4/4 (the mixed recipe: 8-bit stem, predictors and sums) in int8 containers:
  as the ``*_mixed`` config says, i.e. with its deploy options ``INTEGER_BIAS`` and ``OUTPUT_QUANTIZERS``
  (8-bit conv outputs: every conv, or all but FCOS's tiny box/centerness predictions, a QLinearConv),
  ``fused`` kernels; and without those options, ``fused`` (QLinearConv where the graph allows, ConvInteger
  elsewhere) and ``exact`` (ConvInteger everywhere: float biases, bit-faithful to the Q/DQ reference);
* ONNX Runtime integer, LSQ 8/8 without the options, weights in ``auto`` containers (uint8 + 128 where int8
  could saturate without VNNI) and in plain ``int8`` (what a VNNI CPU runs fastest; may saturate without
  VNNI);
* PyTorch eager fp32 of the float network.

Target: integer >= 2.5x faster than ONNX Runtime fp32 (measured on an AVX512-VNNI CPU; int8 speed depends
on the ISA, printed with the table).

``--models label=config:weights ...`` exports each trained checkpoint (``--kernels``, default ``auto``)
and prints gates 1, 2 and 4 on ``--parity-images`` test images and the box AP of the ONNX Runtime model
next to the PyTorch fake-quant model's on the config's test set (gate 3: |delta AP| <= 0.3).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from bench._load import LoadCheck  # noqa: E402

COCO = ROOT / "configs" / "detectron2" / "coco"
SHAPES = ROOT / "configs" / "detectron2" / "shapes"
#: --arch -> (float config, LSQ 4/4 mixed config)
ARCHS = {
    "retinanet_coco": (COCO / "retinanet_R_18_FPN_1x_fullbn_float.yaml", COCO / "retinanet_R_18_FPN_1x_fullbn_lsq_w4a4_mixed.yaml"),
    "retinanet_shapes": (SHAPES / "retinanet_R_18_FPN_fullbn_float.yaml", SHAPES / "retinanet_R_18_FPN_fullbn_lsq_w4a4_mixed.yaml"),
    "fcos_shapes": (
        ROOT / "configs" / "AdelaiDet" / "shapes" / "fcos_R_18_FPN_fullbn_float.yaml",
        ROOT / "configs" / "AdelaiDet" / "shapes" / "fcos_R_18_FPN_fullbn_lsq_w4a4_mixed.yaml",
    ),
}  # fmt: skip
EIGHT_BITS = ["MODEL.QUANTIZATION.WEIGHT.BITS", 8, "MODEL.QUANTIZATION.ACTIVATION.BITS", 8]
TARGET_SPEEDUP = 2.5
MAX_DELTA_AP = 0.3


def _cfg(config: Path, opts: list):
    import adet.modeling  # noqa: F401  (AdelaiDet's meta-architectures)
    from adet.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(config))
    # Random weights, never trained: no distillation teacher (the *_mixed recipe's KD reads MODEL.WEIGHTS).
    no_teacher = ["MODEL.QUANTIZATION.DISTILLATION.ENABLED", False] if cfg.MODEL.QUANTIZATION.ENABLED else []
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *no_teacher, *opts])
    return cfg


def _random_model(config: Path, opts: list):
    """Build with random weights; one random image (train mode) initialises the data-driven quantizers."""
    import torch
    from detectron2.modeling import build_model

    from model_quantization.deploy import adapter_for
    from model_quantization.quantizers import Quantizer

    torch.manual_seed(0)
    cfg = _cfg(config, opts)
    model = build_model(cfg)
    adapter = adapter_for(model)
    side = 2 * adapter.size_divisibility
    network = adapter.network().train()
    with torch.no_grad():
        network(torch.rand(2, 3, side, side) * 255)
        # Quantizers that saw the same tensor (the two head towers' inputs) now share a step and the ONNX
        # exporter would merge their Q nodes, fusing convs that a trained model's distinct steps do not.
        active = [
            q for q in network.modules() if isinstance(q, Quantizer) and q.enabled and q.role == "activation"
        ]
        for i, quantizer in enumerate(active):
            quantizer.step.mul_(1 + 1e-3 * (i + 1))
    return cfg, model.eval()


def _padded(size: tuple[int, int], divisibility: int) -> tuple[int, int]:
    return tuple(-(-s // divisibility) * divisibility for s in size)


def _median_seconds(run, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class SpeedRow:
    name: str
    file_mb: float | None
    seconds: dict[tuple[int, int], float]


def speed(
    arch: str, sizes: list[tuple[int, int]], threads: int, iters: int, warmup: int, workdir: Path
) -> list[SpeedRow]:
    import torch

    from model_quantization.deploy import adapter_for, export_model, make_session
    from model_quantization.detectron2.config import WITHOUT_DEPLOY_OPTIONS

    float_config, quantized_config = ARCHS[arch]
    # The *_mixed recipe as configured (with its deploy options INTEGER_BIAS and OUTPUT_QUANTIZERS), and
    # without them: every conv whose output no quantizer takes next is then a ConvInteger with float output.
    plain = [*WITHOUT_DEPLOY_OPTIONS]
    variants = [
        ("ONNX Runtime fp32, float model", float_config, [], {}),
        ("ONNX Runtime integer, LSQ 4/4 mixed without INTEGER_BIAS / OUTPUT_QUANTIZERS, fused", quantized_config, plain, {"kernels": "fused"}),
        ("ONNX Runtime integer, LSQ 4/4 mixed (the recipe: + INTEGER_BIAS + OUTPUT_QUANTIZERS), fused", quantized_config, [], {"kernels": "fused"}),
        ("ONNX Runtime integer, LSQ 4/4 mixed without them, exact", quantized_config, plain, {"kernels": "exact"}),
        ("ONNX Runtime integer, LSQ 8/8 without them, fused (auto containers)", quantized_config, plain + EIGHT_BITS, {"kernels": "fused"}),
        ("ONNX Runtime integer, LSQ 8/8 without them, fused (int8: VNNI)", quantized_config, plain + EIGHT_BITS, {"kernels": "fused", "weight_container": "int8"}),
    ]  # fmt: skip
    rows = []
    float_network = divisibility = None
    for index, (name, config, opts, options) in enumerate(variants):
        cfg, model = _random_model(config, opts)
        adapter = adapter_for(model)
        divisibility = adapter.size_divisibility
        if index == 0:
            float_network = adapter.network().eval()
        path = workdir / f"variant{index}.onnx"
        report = export_model(cfg, model, path, parity_images=0, **options)
        print(f"  exported {name}: {report.coverage}", file=sys.stderr)
        session = make_session(path, threads=threads)
        seconds = {}
        for size in sizes:
            image = (torch.rand(1, 3, *_padded(size, divisibility)) * 255).numpy()
            seconds[size] = _median_seconds(
                lambda image=image, session=session: session.run(None, {"image": image}), iters, warmup
            )
        rows.append(SpeedRow(name, report.file_bytes / 1e6, seconds))
    torch.set_num_threads(threads)
    seconds = {}
    with torch.no_grad():
        for size in sizes:
            image = torch.rand(1, 3, *_padded(size, divisibility)) * 255
            seconds[size] = _median_seconds(lambda image=image: float_network(image), iters, warmup)
    rows.append(SpeedRow("PyTorch eager fp32, float model", None, seconds))
    return rows


def speed_table(rows: list[SpeedRow], sizes: list[tuple[int, int]], divisibility: int) -> str:
    head = "| network | file MB | " + " | ".join(
        f"{h}x{w} ms (padded {ph}x{pw}) | x ORT fp32"
        for (h, w), (ph, pw) in ((s, _padded(s, divisibility)) for s in sizes)
    )
    lines = [head + " |", "|---|---:|" + "---:|---:|" * len(sizes)]
    base = rows[0].seconds
    for row in rows:
        cells = [f"{row.seconds[s] * 1e3:.0f} | {base[s] / row.seconds[s]:.2f}" for s in sizes]
        size = f"{row.file_mb:.2f}" if row.file_mb is not None else "-"
        lines.append(f"| {row.name} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gates(models: list[str], parity_images: int, threads: int, workdir: Path, kernels: str = "auto") -> str:
    """Export each ``label=config:weights`` with `kernels`; gates 1, 2, 4 and AP (ONNX Runtime vs PyTorch)."""
    from model_quantization.deploy import evaluate_onnx, evaluate_pytorch, export_model
    from model_quantization.export import load_cfg, load_model

    lines = [
        "| model | gate 1: max steps (same inputs / free-running) | gate 2: min cosine | gate 4: integer convs "
        "| AP PyTorch | AP ONNX Runtime | delta AP | file MB | kernels |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for spec in models:
        label, _, rest = spec.partition("=")
        config, _, weights = rest.rpartition(":")
        cfg = load_cfg(Path(config), [])
        model = load_model(cfg, Path(weights))
        path = workdir / f"{label}.onnx"
        report = export_model(cfg, model, path, parity_images=parity_images, threads=threads, kernels=kernels)
        print(report, file=sys.stderr)
        ap_torch = evaluate_pytorch(cfg, model)["bbox"]["AP"]
        ap_onnx = evaluate_onnx(cfg, path, model=model, threads=threads)["bbox"]["AP"]
        ref, eng, cov = report.reference, report.engine, report.coverage
        delta = ap_onnx - ap_torch
        lines.append(
            f"| {label} | {ref.forced.max_steps:g} / {ref.free.max_steps:g} ({'PASS' if ref.passed else 'FAIL'}) "
            f"| {eng.min_cosine:.5f} ({'PASS' if eng.passed else 'FAIL'}) "
            f"| {cov.integer_convs}/{cov.quantized_convs} ({'PASS' if report.coverage_passed else 'FAIL'}) "
            f"| {ap_torch:.2f} | {ap_onnx:.2f} | {delta:+.2f} ({'PASS' if abs(delta) <= MAX_DELTA_AP else 'FAIL'}) "
            f"| {report.file_bytes / 1e6:.2f} | {report.passes.kernels} |"
        )
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="retinanet_coco", help="speed table model")
    parser.add_argument("--sizes", default="512x512,800x1333", help="comma-separated HxW")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-speed", action="store_true", help="only the --models gates")
    parser.add_argument("--models", nargs="*", default=[], help="label=config:weights of trained checkpoints")
    parser.add_argument("--parity-images", type=int, default=4)
    parser.add_argument(
        "--kernels", default="auto", help="--models: export_model's kernels (auto, fused, exact)"
    )
    args = parser.parse_args(argv)
    sizes = [_size(s) for s in args.sizes.split(",")]

    import onnxruntime
    import torch

    from model_quantization.deploy import adapter_for, cpu_isa

    with tempfile.TemporaryDirectory(prefix="mq-bench-deploy-") as tmp:
        workdir = Path(tmp)
        isa = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in cpu_isa().items())
        print(
            f"ONNX Runtime {onnxruntime.__version__}, torch {torch.__version__}, {args.threads} threads, "
            f"batch 1; CPU: {isa}"
        )
        if not args.no_speed:
            with LoadCheck() as load:
                rows = speed(args.arch, sizes, args.threads, args.iters, args.warmup, workdir)
            with contextlib.redirect_stdout(sys.stderr):
                _, model = _random_model(ARCHS[args.arch][0], [])
            divisibility = adapter_for(model).size_divisibility
            print(
                f"\nNetwork latency, {args.arch}, median of {args.iters} (target: integer >= {TARGET_SPEEDUP}x ORT fp32)"
            )
            print(speed_table(rows, sizes, divisibility))
            print(load.line())
        if args.models:
            print(
                f"\nGates of trained models ({args.parity_images} test images for gates 1-2; AP on each config's test set)"
            )
            print(gates(args.models, args.parity_images, args.threads, workdir, args.kernels))


if __name__ == "__main__":
    main()
