"""QAT training-step cost: time per step and peak memory of float vs LSQ 4-bit, eager vs ``torch.compile``.

RetinaNet R-18 FPN (Full-BN, the shapes config: 128 FPN channels, 2-conv towers) on the shapes dataset,
images resized to SIZE x SIZE, batch B, SGD as the config says; the same model, data and optimizer with
MODEL.QUANTIZATION off and on (LSQ w4a4 Quantize-All), each eager and with ``MODEL.QUANTIZATION.COMPILE``
(backbone, FPN and head compiled; the rest of RetinaNet eager). Each variant runs in its own process,
``--rounds`` times alternating; the table keeps each variant's best median step time.

* s/iter: median over ``--iters`` steps after the warm-up (the warm-up holds the quantizers' data-driven
  initialisation, which runs eagerly, and the compilation).
* peak MB: memory of training itself: the growth of the resident set during the timed steps over the
  resident set just before them (after ``gc`` and ``malloc_trim``; Linux VmHWM), i.e. activations and
  temporaries, plus the gradients and optimizer state that live between steps. On CUDA the same from
  ``torch.cuda.max_memory_allocated``. Neither counts libraries, weights, or what compilation keeps.
* compile s: the one-off cost of compiling, i.e. the compiling step's time minus a median step, with an
  empty Inductor cache (first round); after a slash, the same with the cache the first round filled (a
  restarted training run; later rounds).

Every variant's model is built by the build hook, which on CPU makes glibc keep freed memory for reuse
(:mod:`model_quantization.allocator`); ``MODEL_QUANTIZATION_MALLOC=system`` measures glibc's defaults. The
table's first line says which.

Targets (issue 15): compiled QAT <= 1.0x the float *eager* step time and <= 1.15x the float compiled step;
QAT peak memory <= 1.3x float eager.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from bench._load import LoadCheck  # noqa: E402

SHAPES = ROOT / "configs" / "detectron2" / "shapes"
FLOAT_CONFIG = SHAPES / "retinanet_R_18_FPN_fullbn_float.yaml"
QAT_CONFIG = SHAPES / "retinanet_R_18_FPN_fullbn_lsq_w4a4.yaml"
#: name -> (config, compiled)
VARIANTS = {
    "float": (FLOAT_CONFIG, False),
    "float compiled": (FLOAT_CONFIG, True),
    "lsq w4a4": (QAT_CONFIG, False),
    "lsq w4a4 compiled": (QAT_CONFIG, True),
}
SIZES, BATCHES = (128, 512), (2, 8)
TIME_VS_FLOAT_EAGER, TIME_VS_FLOAT_COMPILED, MEMORY_VS_FLOAT_EAGER = 1.0, 1.15, 1.3


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only: freed heap pages back, RSS ~ live
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(
    config: str, compiled: bool, iters: int, warmup: int, threads: int, batch: int, size: int, device: str
) -> dict:
    """Run in a fresh process: build, warm up (and compile), then time `iters` SGD steps on fixed batches."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T
    from detectron2.data.dataset_mapper import DatasetMapper
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    from model_quantization.allocator import kept
    from model_quantization.compilation import compiled_units

    cuda = device.startswith("cuda")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(
        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, "SOLVER.IMS_PER_BATCH", batch,
         "MODEL.QUANTIZATION.COMPILE", compiled]
    )  # fmt: skip
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    mapper = DatasetMapper(
        is_train=True, augmentations=[T.ResizeShortestEdge(size, size)], image_format="BGR"
    )
    dicts = DatasetCatalog.get("shapes_tiny_train")
    batches = [[mapper(dicts[(i * batch + j) % len(dicts)]) for j in range(batch)] for i in range(4)]
    model.train()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(i: int) -> float:
        sync()
        start = time.perf_counter()
        loss = sum(model(batches[i % len(batches)]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sync()
        return time.perf_counter() - start

    def compiled_calls() -> int:
        return sum(u.compiled_calls for u in compiled_units(model).values())

    warmup = max(warmup, 3) if compiled else warmup  # eager init step, compiling step, one more
    compile_step_s = None
    with EventStorage(0) as storage:
        for i in range(warmup):
            storage.iter = i
            before = compiled_calls()
            seconds = step(i)
            if compile_step_s is None and compiled_calls() > before:
                compile_step_s = seconds  # the step that compiled (QAT: the second; the first initialises)
        _release_free_memory()
        persistent = sum(
            p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
        )
        persistent += sum(
            t.numel() * t.element_size()
            for state in optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            start_bytes = torch.cuda.memory_allocated()
        else:
            start_bytes = _status_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
        times = []
        for i in range(iters):
            storage.iter = warmup + i
            times.append(step(i))
        if cuda:
            peak_bytes = torch.cuda.max_memory_allocated()
        else:
            peak_bytes = _status_kib("VmHWM") * 1024
    median = statistics.median(times)
    units = compiled_units(model)
    failure = next((u.group.failure for u in units.values() if u.group.failure), None)
    return {
        "sec_per_iter": median,
        "peak_mb": (peak_bytes - start_bytes + persistent) / 2**20,
        "params": sum(p.numel() for p in model.parameters()),
        "compile_s": None if compile_step_s is None else max(compile_step_s - median, 0.0),
        "compiled": sorted(units) if compiled else [],
        "compile_failure": failure,
        "compiled_calls": sum(u.compiled_calls for u in units.values()),
        "freed_memory_kept": kept(),
    }


def _child(name: str, size: int, batch: int, args: dict, cache_dir: str) -> dict:
    config, compiled = VARIANTS[name]
    cmd = [
        sys.executable, __file__, "--child", str(config), "--compiled", str(int(compiled)),
        "--iters", str(args["iters"]), "--warmup", str(args["warmup"]), "--threads", str(args["threads"]),
        "--batch", str(batch), "--size", str(size), "--device", args["device"],
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} ({size} px, batch {batch}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(
    iters: int = 20,
    warmup: int = 3,
    threads: int = 2,
    batches: tuple[int, ...] = BATCHES,
    sizes: tuple[int, ...] = SIZES,
    rounds: int = 2,
    variants: tuple[str, ...] = tuple(VARIANTS),
    device: str = "cpu",
) -> dict[tuple[int, int], dict[str, dict]]:
    """Measure every variant at every (size, batch) `rounds` times, alternating, each in a fresh process.

    Returns {(size, batch): {variant: result}} with each variant's best median step time, its largest peak
    memory, and its compile time with an empty Inductor cache (first round) and with a warm one (later).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    args = {"iters": iters, "warmup": warmup, "threads": threads, "device": device}
    results: dict[tuple[int, int], dict[str, dict]] = {}
    # An empty Inductor cache, so that the first round's compile time is that of a first run; an explicit
    # TORCHINDUCTOR_CACHE_DIR is used as it is (and kept).
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    cache_dir = given or tempfile.mkdtemp(prefix="mq-bench-inductor-")
    try:
        for round_index in range(rounds):
            for size in sizes:
                for batch in batches:
                    table = results.setdefault((size, batch), {})
                    for name in variants:
                        sample = _child(name, size, batch, args, cache_dir)
                        best = table.get(name)
                        if best is None:
                            table[name] = {**sample, "compile_warm_s": None}
                            continue
                        if (
                            round_index > 0
                            and sample["compile_s"] is not None
                            and best["compile_warm_s"] is None
                        ):
                            best["compile_warm_s"] = sample["compile_s"]
                        best["peak_mb"] = max(best["peak_mb"], sample["peak_mb"])
                        if sample["sec_per_iter"] < best["sec_per_iter"]:
                            best["sec_per_iter"] = sample["sec_per_iter"]
    finally:
        if not given:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return results


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    return a[key] / b[key] if a is not None and b is not None else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "not measured"
    return f"{'met' if value <= target else 'NOT met'} ({value:.2f}x)"


def to_markdown(
    results: dict[tuple[int, int], dict[str, dict]],
    threads: int,
    iters: int,
    rounds: int,
    device: str = "cpu",
    load: LoadCheck | None = None,
) -> str:
    """The table (one row per size, batch and variant) and the verdict on each target, per setting."""
    where = f"{threads} CPU threads" if device == "cpu" else device
    if device == "cpu":
        kept = {r.get("freed_memory_kept") for table in results.values() for r in table.values()}
        where += ", glibc keeps freed memory" if kept == {True} else ", glibc's default malloc trimming"
    lines = [
        f"RetinaNet R-18 FPN Full-BN (shapes), {where}, median of {iters} steps (best of {rounds} processes), "
        f"{(load or LoadCheck()).line()}.",
        "",
        "| px | batch | variant | s/iter | x float | x float compiled | peak MB | x float | compile s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for (size, batch), table in results.items():
        base, base_compiled = table.get("float"), table.get("float compiled")
        for name, r in table.items():
            compile_s = ""
            if r["compile_s"] is not None:
                compile_s = f"{r['compile_s']:.0f}"
                if r.get("compile_warm_s") is not None:
                    compile_s += f" / {r['compile_warm_s']:.0f}"
            if r.get("compile_failure"):
                compile_s = f"failed: {r['compile_failure']}"
            vs_compiled = _ratio(r, base_compiled, "sec_per_iter") if name.endswith("compiled") else None
            lines.append(
                f"| {size} | {batch} | {name} | {r['sec_per_iter']:.3f} | {_fmt(_ratio(r, base, 'sec_per_iter'))} "
                f"| {_fmt(vs_compiled)} | {r['peak_mb']:.0f} | {_fmt(_ratio(r, base, 'peak_mb'))} | {compile_s} |"
            )
        qat, qat_compiled = table.get("lsq w4a4"), table.get("lsq w4a4 compiled")
        verdicts.append(
            f"- {size} px, batch {batch}: compiled QAT time <= {TIME_VS_FLOAT_EAGER}x float eager: "
            f"{_verdict(_ratio(qat_compiled, base, 'sec_per_iter'), TIME_VS_FLOAT_EAGER)}; "
            f"<= {TIME_VS_FLOAT_COMPILED}x float compiled: "
            f"{_verdict(_ratio(qat_compiled, base_compiled, 'sec_per_iter'), TIME_VS_FLOAT_COMPILED)}; "
            f"QAT peak memory <= {MEMORY_VS_FLOAT_EAGER}x float eager: compiled "
            f"{_verdict(_ratio(qat_compiled, base, 'peak_mb'), MEMORY_VS_FLOAT_EAGER)}, eager "
            f"{_verdict(_ratio(qat, base, 'peak_mb'), MEMORY_VS_FLOAT_EAGER)}"
        )
    return "\n".join([*lines, "", "Targets:", *verdicts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.child:
        result = measure(
            args.child,
            bool(args.compiled),
            args.iters,
            args.warmup,
            args.threads,
            args.batch,
            args.size,
            args.device,
        )
        print(json.dumps(result))
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available to torch")
    with LoadCheck() as load:
        results = run(
            args.iters, args.warmup, args.threads, tuple(args.batches), tuple(args.sizes), args.rounds,
            tuple(args.variants), args.device,
        )  # fmt: skip
    print(to_markdown(results, args.threads, args.iters, args.rounds, args.device, load))


if __name__ == "__main__":
    main()
