"""Fake-quant speed: forward + backward time per element of every quantizer on an activation-sized tensor.

Run ``python bench/fake_quant.py`` (under 15 s on 2 cores; ``--markdown`` for the README table). Rows, all measured in the same
process on the same tensor:

* ``relu`` -- ``torch.relu`` forward + backward: the memory-bound floor any element-wise op pays;
* ``torch native`` -- ``torch._fake_quantize_learnable_per_tensor_affine`` (learnable scale, like LSQ);
* ``lsq naive`` -- LSQ as a composition of element-wise torch ops, gradients derived by autograd;
* ``lsq fused`` -- :func:`model_quantization.functional.lsq_fake_quant` on the default backend (the compiled
  CPU kernel when available), and ``lsq eager`` -- the same analytic function without the kernel;
* one row per registered quantizer as used on activations.

Times are the best (``--statistic median``: the median) over round-robin repeats of ``iters``
forward+backward calls; ``x relu`` is the ratio to the ReLU row of the same run. The backward is
``torch.autograd.grad`` to the input (and the quantizer's parameters), as inside a network: an identity
(straight-through) backward then hands the gradient on without the copy that accumulating it into a
leaf's ``.grad`` would add. ``--compile`` adds a ``torch.compile``d naive LSQ and one compiled row per
quantizer (each compiles for a few seconds on a GPU, up to a minute on 2 CPU cores). ``--device cuda``
runs everything on the GPU (the C kernels are CPU-only: there the rows show the eager PyTorch ops, and the
compiled rows Triton's fusion).

On glibc, the script first raises malloc's mmap and trim thresholds (:func:`steady_heap`): otherwise
whether a tensor-sized allocation comes from fresh, page-faulting memory or from the heap depends on the
process's allocation history, and the ReLU floor measured 0.40-0.76 ns/element across identical runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script: bench._load, and the library
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # uninstalled in a source checkout

from bench._load import LoadCheck  # noqa: E402
from model_quantization import functional as F  # noqa: E402
from model_quantization.kernels import cpu as cpu_kernels  # noqa: E402
from model_quantization.quantizers import QUANTIZERS, QuantizerRecipe, build_quantizer  # noqa: E402

DEFAULT_SHAPE = (8, 64, 64, 64)
LSQ_TARGET_RATIO = 2.0  # fused LSQ forward+backward should cost at most twice the ReLU floor
QUANTIZER_TARGET_RATIO = 2.0  # and so should every registered quantizer (issue 15)


@dataclass(frozen=True)
class BenchRow:
    name: str
    ns_per_elem: float
    ratio_to_relu: float
    note: str = ""


def _time_all(
    steps: list[Callable[[], None]],
    numel: int,
    iters: int,
    repeats: int,
    statistic: str = "min",
    sync: Callable[[], None] = lambda: None,
) -> list[float]:
    """Best (or median) over ``repeats`` of the mean time of ``iters`` calls of each step, in ns/element.

    Repeats go round-robin over the cases, so a burst of load from another process hits one repeat of
    every case rather than all repeats of one; the minimum then estimates the undisturbed cost.
    """
    for step in steps:  # warm-up: allocator, lazy initialisation, kernel build
        step()
        step()
    samples: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, times in zip(steps, samples, strict=True):
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                step()
            sync()
            times.append((time.perf_counter() - start) / iters)
    reduce = min if statistic == "min" else statistics.median
    return [reduce(times) / numel * 1e9 for times in samples]


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor, params=()):
    leaf = x.detach().clone().requires_grad_(True)
    inputs = (leaf, *params)

    def step() -> None:
        torch.autograd.grad(fn(leaf), inputs, grad)

    return step


def _compiled(module: torch.nn.Module, x: torch.Tensor, name: str) -> tuple[Callable | None, str]:
    """``torch.compile(module)`` compiled on ``x`` now (so that the timing does not include it), or None and
    why it failed."""
    compiled = torch.compile(module, fullgraph=True)
    start = time.perf_counter()
    leaf = x.detach().clone().requires_grad_(True)
    try:
        torch.autograd.grad(compiled(leaf).sum(), [leaf, *module.parameters()])
    except Exception as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"{name}: compile failed ({type(exc).__name__}: {cause[:120]})"
    return compiled, f"{name}, torch.compile (fullgraph; compiled in {time.perf_counter() - start:.0f} s)"


def _cases(
    x: torch.Tensor, bits: int, with_compile: bool, compile_methods: tuple[str, ...] | None = None
) -> list[tuple[str, Callable, tuple, str]]:
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    device = x.device
    step = torch.tensor(0.05, requires_grad=True, device=device)
    scale = torch.tensor([0.05], requires_grad=True, device=device)
    zero_point = torch.tensor([0.0], requires_grad=True, device=device)
    g = 1.0 / (x[0].numel() * qp) ** 0.5
    cases = [
        ("relu", torch.relu, (), "memory-bound floor"),
        (
            "torch native",
            lambda t: torch._fake_quantize_learnable_per_tensor_affine(t, scale, zero_point, -qn, qp, g),
            (scale, zero_point),
            "_fake_quantize_learnable_per_tensor_affine",
        ),
        (
            "lsq naive",
            lambda t: F.lsq_fake_quant_reference(t, step, qn, qp, grad_scale=g),
            (step,),
            "autograd composition",
        ),
        ("lsq fused", lambda t: F.lsq_fake_quant(t, step, qn, qp, grad_scale=g), (step,), ""),
    ]

    def lsq_eager(t: torch.Tensor) -> torch.Tensor:
        with F.backend("eager"):
            return F.lsq_fake_quant(t, step, qn, qp, grad_scale=g)

    cases.append(("lsq eager", lsq_eager, (step,), "analytic backward, no kernel"))
    if with_compile:
        compiled = torch.compile(lambda t: F.lsq_fake_quant_reference(t, step, qn, qp, grad_scale=g))
        cases.append(("lsq torch.compile", compiled, (step,), "inductor, naive formula"))
    for name in QUANTIZERS.names():
        cls = QUANTIZERS.get(name)
        signed = True in cls.signedness["activation"]
        recipe = QuantizerRecipe(name, bits=1 if name == "binary" else bits, signed=signed)
        quantizer = build_quantizer(recipe, "activation").to(device)
        quantizer.train()
        sample = x if signed else x.relu()
        quantizer(sample)  # data-driven initialisation outside the timed region
        note = f"{quantizer.__class__.__name__}, {'signed' if signed else 'unsigned, input relu(x)'}"
        label = f"{name} ({quantizer.bits_label}-bit)"
        cases.append((label, quantizer, tuple(quantizer.parameters()), note))
        if with_compile and (compile_methods is None or name in compile_methods):
            compiled, why = _compiled(quantizer, sample, quantizer.__class__.__name__)
            if compiled is None:
                print(f"{label}: {why}", file=sys.stderr)
                continue
            unsigned = "" if signed else ", unsigned, input relu(x)"
            cases.append((f"{label} compiled", compiled, tuple(quantizer.parameters()), why + unsigned))
    return cases


def run(
    shape: tuple[int, ...] = DEFAULT_SHAPE,
    threads: int = 2,
    bits: int = 4,
    iters: int = 10,
    repeats: int = 5,
    with_compile: bool = False,
    statistic: str = "min",
    device: str = "cpu",
    compile_methods: tuple[str, ...] | None = None,
) -> list[BenchRow]:
    """Measure every row; returns them in table order. ``statistic``: "min" or "median" over repeats;
    ``compile_methods``: the quantizers that get a compiled row with ``with_compile`` (None: all)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    grad = torch.randn(shape, device=device)
    cases = _cases(x, bits, with_compile, compile_methods)
    nonnegative = x.relu()
    steps = [
        _fwd_bwd(fn, nonnegative if "unsigned" in note else x, grad, params) for _, fn, params, note in cases
    ]
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = _time_all(steps, x.numel(), iters, repeats, statistic, sync)
    relu = times[0]
    rows = [BenchRow(name, t, t / relu, note) for (name, _, _, note), t in zip(cases, times, strict=True)]
    # The kernel is built lazily by the first call, so its status is only known now.
    return [
        BenchRow(r.name, r.ns_per_elem, r.ratio_to_relu, f"kernel: {cpu_kernels.status()}")
        if r.name == "lsq fused"
        else r
        for r in rows
    ]


def _verdict(rows: list[BenchRow]) -> str:
    fused = next(r for r in rows if r.name == "lsq fused")
    met = "met" if fused.ratio_to_relu <= LSQ_TARGET_RATIO else "NOT met"
    lines = [f"LSQ target (fused fwd+bwd <= {LSQ_TARGET_RATIO:g}x ReLU): {met} ({fused.ratio_to_relu:.2f}x)"]
    # Every registered quantizer, on its default path (the rows named "<method> (<bits>-bit)").
    quantizers = [r for r in rows if r.name.split(" (")[0] in QUANTIZERS.names() and r.name.endswith("-bit)")]
    if quantizers:
        worst = max(quantizers, key=lambda r: r.ratio_to_relu)
        met = "met" if worst.ratio_to_relu <= QUANTIZER_TARGET_RATIO else "NOT met"
        over = [
            f"{r.name} {r.ratio_to_relu:.2f}x" for r in quantizers if r.ratio_to_relu > QUANTIZER_TARGET_RATIO
        ]
        lines.append(
            f"Every quantizer fwd+bwd <= {QUANTIZER_TARGET_RATIO:g}x ReLU: {met} (worst: {worst.name} "
            f"{worst.ratio_to_relu:.2f}x{'; over: ' + ', '.join(over) if over else ''})"
        )
    return "\n".join(lines)


def format_table(rows: list[BenchRow], load: LoadCheck | None = None) -> str:
    """Plain-text table for the terminal, under how loaded the machine was while it measured."""
    width = max(len(r.name) for r in rows)
    lines = [(load or LoadCheck()).line(), ""]
    lines += [f"{'quantizer':<{width}}  {'ns/elem':>8}  {'x relu':>7}  note", "-" * (width + 40)]
    lines += [f"{r.name:<{width}}  {r.ns_per_elem:8.2f}  {r.ratio_to_relu:7.2f}  {r.note}" for r in rows]
    return "\n".join([*lines, "", _verdict(rows)])


def to_markdown(
    rows: list[BenchRow],
    shape: tuple[int, ...] = DEFAULT_SHAPE,
    threads: int = 2,
    device: str = "cpu",
    load: LoadCheck | None = None,
) -> str:
    """The table as Markdown (for the README)."""
    where = f"{threads} CPU threads" if device == "cpu" else device
    lines = [
        f"Forward + backward per element, float32 tensor {'x'.join(map(str, shape))}, "
        f"{where}, torch {torch.__version__}, {(load or LoadCheck()).line()}.",
        "",
        "| quantizer | ns/elem | x ReLU | note |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {r.name} | {r.ns_per_elem:.2f} | {r.ratio_to_relu:.2f} | {r.note} |" for r in rows]
    return "\n".join([*lines, "", _verdict(rows)])


def steady_heap(threshold: int = 256 << 20) -> bool:
    """Serve allocations below `threshold` bytes from the heap and keep freed memory (glibc ``mallopt``).

    A training process reaches that state by itself (glibc raises its mmap threshold after the first large
    free); a short benchmark may not, so every row would pay page faults that vary from run to run. Returns
    False where there is no glibc (nothing changed).
    """
    import ctypes

    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(
            libc.mallopt(m_trim_threshold, threshold)
        )
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=list(DEFAULT_SHAPE))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--compile", action="store_true", help="add torch.compile'd rows: a naive LSQ and each quantizer"
    )
    parser.add_argument("--statistic", choices=["min", "median"], default="min", help="over the repeats")
    parser.add_argument("--markdown", action="store_true", help="print Markdown instead of plain text")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--compile-methods",
        nargs="+",
        choices=QUANTIZERS.names(),
        help="with --compile: only these (default: all)",
    )
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch")
    shape = tuple(args.shape)
    steady_heap()
    with LoadCheck() as load:
        rows = run(
            shape, args.threads, args.bits, args.iters, args.repeats, args.compile, args.statistic, args.device,
            tuple(args.compile_methods) if args.compile_methods else None,
        )  # fmt: skip
    print(
        to_markdown(rows, shape, args.threads, args.device, load)
        if args.markdown
        else format_table(rows, load)
    )


if __name__ == "__main__":
    main()
