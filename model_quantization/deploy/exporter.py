"""Export any network to an integer ONNX graph: lower, trace with torch.onnx (dynamo), prepare for ONNX Runtime.

:func:`export_network` is the generic core (a network taking one image tensor and returning a tuple of
tensors); :func:`model_quantization.deploy.export_model` wraps it for detectors. One trace produces both
graphs: the *debug* graph, whose extra outputs are every Q/DQ call (``<quantizer>#<call>``, for reference
parity), and the *deploy* graph, the same graph without those outputs.

The route, pinned by ``tests/unit/test_deploy_export.py``: ``torch.onnx.export(..., dynamo=True,
custom_translation_table=TRANSLATIONS)`` on the lowered network, whose quantizers are our own custom ops
(:mod:`.ops`); the result holds standard ONNX ops only (``QuantizeLinear``, ``Clip``, ``DequantizeLinear``,
and ``ConvInteger`` after :mod:`.onnx_passes`), no custom domain.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from .grids import ExportError
from .lowering import LoweringSummary, TapRecorder, check_levels, lower, reset_levels
from .onnx_passes import PassReport, prepare_for_onnxruntime, remove_unused
from .ops import LIBRARY, TRANSLATIONS

__all__ = [
    "DEFAULT_OPSET",
    "ExportedNetwork",
    "export_network",
    "node_counts",
    "with_kernels",
    "write_atomic",
]

#: ONNX opset of the exported graphs: torch.onnx's dynamo exporter translates natively from 18 (>= 17, the
#: first with per-axis DequantizeLinear everywhere we need it).
DEFAULT_OPSET = 18
INPUT_NAME = "image"


class _Tapped(nn.Module):
    """The lowered network, returning its Q/DQ outputs after its own outputs."""

    def __init__(self, network: nn.Module, recorder: TapRecorder) -> None:
        super().__init__()
        self.network = network
        self.recorder = recorder

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.recorder.start()
        outputs = self.network(image)
        taps = self.recorder.stop()
        return (*outputs, *(value for _, value in taps))


@dataclass
class ExportedNetwork:
    """The result of :func:`export_network`.

    Attributes:
        deploy: the graph to ship.
        debug: the same graph with every Q/DQ call as an extra output (after the head outputs).
        output_names: the deploy graph's outputs.
        tap_names: the debug graph's extra outputs, ``<quantizer>#<call>``.
        lowering: what lowering did (quantized modules, activation grids, folded norms).
        passes: what the ONNX Runtime passes changed.
        traced: the debug graph before those passes (what :func:`with_kernels` starts from).
        weight_container: the container the passes were asked for.
    """

    deploy: onnx.ModelProto
    debug: onnx.ModelProto
    output_names: list[str]
    tap_names: list[str]
    lowering: LoweringSummary
    passes: PassReport
    traced: onnx.ModelProto
    weight_container: str


def _check_standard(model: onnx.ModelProto) -> None:
    domains = {node.domain for node in model.graph.node} - {"", "ai.onnx"}
    leftovers = [n.op_type for n in model.graph.node if LIBRARY in n.op_type or n.domain in domains]
    if domains or leftovers:
        raise ExportError(
            f"the exported graph uses non-standard ops {sorted(set(leftovers))} (domains {domains})"
        )


def export_network(
    network: nn.Module,
    example: torch.Tensor,
    output_names: Sequence[str],
    *,
    dynamic_shapes: Any = None,
    opset: int = DEFAULT_OPSET,
    weight_container: str = "auto",
    kernels: str = "fused",
) -> ExportedNetwork:
    """Lower ``network`` (fake-quant, eval mode) and export it to ONNX.

    Args:
        network: takes one float tensor (named ``image`` in the graph), returns a tuple of tensors.
        example: an input for tracing. Sizes that are 0 or 1 get specialised by ``torch.export``: give
            dynamic dimensions a size of at least 2 (in units of their divisor).
        output_names: names of the network's outputs.
        dynamic_shapes: ``torch.export`` dynamic shapes of the one input, e.g. ``({0: Dim("n")},)``.
        opset: ONNX opset (>= 17).
        weight_container: ``"auto"`` (int8, uint8 + 128 where int8 could saturate), ``"int8"``, ``"uint8"``.
        kernels: ``"fused"`` (QLinearConv where ONNX Runtime fuses, ConvInteger elsewhere), ``"exact"``
            (ConvInteger everywhere: float biases, bit-faithful to the Q/DQ reference) or ``"qdq"`` (the
            plain Q/DQ graph, e.g. for another runtime); see :func:`~.onnx_passes.prepare_for_onnxruntime`.

    Raises:
        ExportError: the network cannot be exported (the message names the module and why).
    """
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: the export needs opset >= 17")
    network.eval()
    lowered, summary, recorder = lower(network, record_taps=True)
    tapped = _Tapped(lowered, recorder).eval()
    with torch.no_grad():
        reset_levels(lowered)
        outputs = tapped(example)
        check_levels(lowered)
    tap_names = [name for name, _ in recorder.taps]
    if len(outputs) != len(output_names) + len(tap_names):
        raise ExportError(
            f"the network returned {len(outputs) - len(tap_names)} outputs, named {len(output_names)}"
        )
    reset_levels(lowered)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        program = torch.onnx.export(
            tapped,
            (example,),
            dynamo=True,
            opset_version=opset,
            custom_translation_table=TRANSLATIONS,
            input_names=[INPUT_NAME],
            output_names=[*output_names, *tap_names],
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    debug = program.model_proto
    found = [o.name for o in debug.graph.output]
    if found != [*output_names, *tap_names]:
        raise ExportError(f"the exported graph's outputs {found[:5]}... are not the expected ones")
    _check_standard(debug)
    # The exporter annotates intermediate tensors with shapes it derived while tracing, and some are wrong
    # for other input sizes (measured: FCOS's per-level Scale output annotated [N, 4, 1, 1]); ONNX Runtime
    # plans buffers from them. Its own shape inference needs none of them.
    del debug.graph.value_info[:]
    return _prepared(debug, list(output_names), tap_names, summary, weight_container, kernels)


def _prepared(
    traced: onnx.ModelProto,
    output_names: list[str],
    tap_names: list[str],
    summary: LoweringSummary,
    weight_container: str,
    kernels: str,
) -> ExportedNetwork:
    """Run the ONNX Runtime passes on a copy of the traced debug graph and cut the deploy graph from it."""
    debug = copy.deepcopy(traced)
    passes = prepare_for_onnxruntime(debug, weight_container, kernels=kernels)
    deploy = copy.deepcopy(debug)
    kept = [o for o in deploy.graph.output if o.name in set(output_names)]
    del deploy.graph.output[:]
    deploy.graph.output.extend(kept)
    remove_unused(deploy)
    onnx.checker.check_model(deploy)
    return ExportedNetwork(deploy, debug, output_names, tap_names, summary, passes, traced, weight_container)


def with_kernels(exported: ExportedNetwork, kernels: str) -> ExportedNetwork:
    """The same traced network with other integer kernels: only the ONNX passes run again, not the trace."""
    return _prepared(
        exported.traced, exported.output_names, exported.tap_names, exported.lowering,
        exported.weight_container, kernels,
    )  # fmt: skip


def node_counts(model: onnx.ModelProto, ops: Sequence[str] | None = None) -> dict[str, int]:
    """How many nodes of each op type (of ``ops`` only, when given) the graph has."""
    counts = Counter(node.op_type for node in model.graph.node)
    return {op: counts[op] for op in ops} if ops is not None else dict(counts)


def write_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Write ``model`` to ``path`` through a temporary file in the same directory, then rename.

    A failure at any point leaves no file at ``path`` (and no stale temporary). Returns the file size.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path.stat().st_size
