"""QAT training-step cost: seconds per iteration and peak memory, float vs LSQ 4-bit Quantize-All.

RetinaNet R-18 FPN (Full-BN) at 128 px, batch 2, 2 CPU threads, on the shapes dataset: the same model,
data and optimizer with MODEL.QUANTIZATION off and on, side by side in one run. Each variant runs in its
own process, so its peak memory is its own: "peak MB" is the growth of the resident set during training
(Linux VmHWM, reset after the model is built, minus the resident set then), i.e. activations, gradients,
optimizer state and allocator caches rather than the interpreter, libraries and weights.

Targets (issue 4): QAT <= 1.2x the float step time and <= 1.3x its peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "configs" / "detectron2" / "shapes"
VARIANTS = {
    "float": SHAPES / "retinanet_R_18_FPN_fullbn_float.yaml",
    "lsq w4a4": SHAPES / "retinanet_R_18_FPN_fullbn_lsq_w4a4.yaml",
}
TIME_TARGET, MEMORY_TARGET = 1.2, 1.3


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(config: str, iters: int, warmup: int, threads: int, batch: int) -> dict:
    """Run in a fresh process: build, warm up, then time `iters` SGD steps on fixed batches."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T
    from detectron2.data.dataset_mapper import DatasetMapper
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", batch])
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    mapper = DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(128, 128)], image_format="BGR")
    dicts = DatasetCatalog.get("shapes_tiny_train")
    batches = [[mapper(dicts[(i * batch + j) % len(dicts)]) for j in range(batch)] for i in range(4)]
    model.train()

    def step(i: int) -> None:
        loss = sum(model(batches[i % len(batches)]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    times = []
    resident = _status_kib("VmRSS")  # model, data and libraries, before any training memory
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    with EventStorage(0) as storage:
        for i in range(warmup):  # includes LSQ's data-driven initialisation and allocator warm-up
            storage.iter = i
            step(i)
        for i in range(iters):
            storage.iter = warmup + i
            start = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - start)
    return {
        "sec_per_iter": statistics.median(times),
        "peak_mb": (_status_kib("VmHWM") - resident) / 1024,
        "params": sum(p.numel() for p in model.parameters()),
    }


def run(
    iters: int = 20, warmup: int = 3, threads: int = 2, batch: int = 2, rounds: int = 2
) -> dict[str, dict]:
    """Measure every variant `rounds` times, alternating, in fresh processes; keep each one's best time."""
    results: dict[str, dict] = {}
    for _ in range(rounds):
        for name, config in VARIANTS.items():
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(config), "--iters", str(iters), "--warmup", str(warmup),
                 "--threads", str(threads), "--batch", str(batch)],
                capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"{name}: {proc.stderr[-2000:]}")
            sample = json.loads(proc.stdout.strip().splitlines()[-1])
            best = results.get(name)
            if best is None or sample["sec_per_iter"] < best["sec_per_iter"]:
                results[name] = {**sample, "peak_mb": max(sample["peak_mb"], (best or sample)["peak_mb"])}
    return results


def to_markdown(results: dict[str, dict], threads: int, batch: int, iters: int, rounds: int) -> str:
    base = results["float"]
    lines = [
        f"RetinaNet R-18 FPN Full-BN, 128 px, batch {batch}, {threads} CPU threads, median of {iters} steps "
        f"(best of {rounds} processes), load average {os.getloadavg()[0]:.2f}.",
        "",
        "| variant | s/iter | x float | peak MB | x float |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['sec_per_iter']:.3f} | {r['sec_per_iter'] / base['sec_per_iter']:.2f} "
            f"| {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f} |"
        )
    q = results["lsq w4a4"]
    t, m = q["sec_per_iter"] / base["sec_per_iter"], q["peak_mb"] / base["peak_mb"]
    lines += [
        "",
        f"Targets: time <= {TIME_TARGET}x: {'met' if t <= TIME_TARGET else 'NOT met'} ({t:.2f}x); "
        f"peak memory <= {MEMORY_TARGET}x: {'met' if m <= MEMORY_TARGET else 'NOT met'} ({m:.2f}x)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.iters, args.warmup, args.threads, args.batch)))
        return
    results = run(args.iters, args.warmup, args.threads, args.batch, args.rounds)
    print(to_markdown(results, args.threads, args.batch, args.iters, args.rounds))


if __name__ == "__main__":
    main()
