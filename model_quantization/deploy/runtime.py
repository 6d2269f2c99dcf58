"""ONNX Runtime sessions, the optimized graph they run, and what the CPU offers int8 kernels.

Two session kinds matter for the gates: the *reference* session (``ORT_DISABLE_ALL``: every Q, DQ and conv
runs as written, the convs in float on dequantized values, i.e. the fake-quant arithmetic) and the
*engine* session (``ORT_ENABLE_ALL``: Q/DQ fused into integer kernels). :func:`integer_coverage` reads
back the graph the engine really runs (``SessionOptions.optimized_model_filepath``) and counts its
integer convolutions.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from .onnx_passes import quantized_convs

__all__ = ["Coverage", "cpu_isa", "integer_coverage", "make_session", "optimized_graph"]

INTEGER_CONVS = ("QLinearConv", "ConvInteger")
FLOAT_CONVS = ("Conv", "FusedConv", "NchwcConv")


def _model_arg(model: onnx.ModelProto | bytes | str | os.PathLike) -> bytes | str:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return model if isinstance(model, bytes) else str(model)


def make_session(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    *,
    optimize: bool = True,
    threads: int | None = None,
    optimized_model_path: str | os.PathLike | None = None,
) -> ort.InferenceSession:
    """A CPU session: all graph optimisations (integer kernels) or none (the Q/DQ reference).

    Args:
        model: a model, its serialized bytes or a path.
        optimize: ``ORT_ENABLE_ALL`` if True, ``ORT_DISABLE_ALL`` otherwise.
        threads: intra-op threads (None: ONNX Runtime's default, one per physical core).
        optimized_model_path: where to write the graph the session runs.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the serialised-optimised-model and unused-initializer warnings
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return ort.InferenceSession(_model_arg(model), options, providers=["CPUExecutionProvider"])


def optimized_graph(
    model: onnx.ModelProto | bytes | str | os.PathLike, threads: int | None = 1
) -> onnx.ModelProto:
    """The graph ONNX Runtime runs after all optimisations (written by the session, read back)."""
    with tempfile.TemporaryDirectory(prefix="mq-ort-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        make_session(model, optimize=True, threads=threads, optimized_model_path=path)
        return onnx.load(str(path))


@dataclass(frozen=True)
class Coverage:
    """Integer convolutions in ONNX Runtime's optimized graph.

    Attributes:
        quantized_convs: convolutions of the exported file with quantized input and weight (``Conv`` on
            two ``DequantizeLinear`` inputs, or ``ConvInteger``).
        integer_convs: ``QLinearConv`` + ``ConvInteger`` nodes in the optimized graph.
        ops: every conv-like op of the optimized graph with its count.
    """

    quantized_convs: int
    integer_convs: int
    ops: dict[str, int]

    @property
    def fraction(self) -> float:
        return self.integer_convs / self.quantized_convs if self.quantized_convs else 1.0

    def __str__(self) -> str:
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.ops.items()))
        return f"{self.integer_convs}/{self.quantized_convs} quantized convs on integer kernels ({self.fraction:.1%}; {ops})"


def integer_coverage(model: onnx.ModelProto | str | os.PathLike, threads: int | None = 1) -> Coverage:
    """Count the quantized convs of ``model`` and the integer convs ONNX Runtime runs for them."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    expected = len(quantized_convs(proto)) + sum(n.op_type == "ConvInteger" for n in proto.graph.node)
    optimized = optimized_graph(proto, threads)
    ops = Counter(n.op_type for n in optimized.graph.node if n.op_type in INTEGER_CONVS + FLOAT_CONVS)
    return Coverage(expected, sum(ops[op] for op in INTEGER_CONVS), dict(ops))


def cpu_isa() -> dict[str, bool]:
    """The x86 vector extensions int8 speed depends on (from /proc/cpuinfo; all False elsewhere)."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return dict.fromkeys(wanted, False)
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {flag: flag in flags for flag in wanted}
