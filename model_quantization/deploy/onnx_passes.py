"""ONNX graph passes that make every quantized convolution run on an integer kernel in ONNX Runtime.

The exported graph is plain QDQ: ``DQ(x) -> Conv(DQ(int8 w)) -> ...``. ONNX Runtime turns a conv into
``QLinearConv`` only when the conv's output goes to exactly one ``QuantizeLinear`` (a ReLU in between is
dropped when that Q has zero point 0). In a detector many quantized convs are not followed by a quantizer:
the one before a residual or FPN sum whose inputs are not quantized (the sum is quantized after the
addition), an FPN output feeding two head towers with different input quantizers, the prediction convs
whose outputs are the network's. Without a pass they run as float convolutions. This module:

* :func:`rewrite_unfused_convs` makes each of those an explicit integer convolution with a float output,
  ``ConvInteger(x codes, uint8 w codes) -> Cast -> Mul(s_x * s_w) -> Add(bias)``: the int32 accumulation is
  exact, so the result is what the float conv computes up to float rounding (reference parity holds);
* :func:`store_weights` stores weights whose codes exceed 7 bits as uint8 with zero point 128
  Without VNNI (AVX2), ONNX Runtime's U8S8 kernels add pairs of uint8 x int8 products in int16 with
  saturation (``vpmaddubsw``), which is exact only while ``2 * 255 * |w| <= 32767``, i.e. ``|w| <= 64``:
  4-bit weights are always safe, 8-bit ones are not (measured here: up to 63 LSB off). U8U8 kernels do not
  saturate; ``ConvInteger`` is also 6x faster with uint8 weights than with int8 ones (ONNX Runtime 1.32).
  It also *spreads* low-bit codes (times a power of two, scale divided by it) so that the int32 bias the
  integer kernels add is fine enough (see its docstring).

Both passes keep the file standard ONNX (``ConvInteger`` is an ai.onnx op since opset 10);
``prepare_for_onnxruntime`` runs them and drops what became unused.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .grids import SAFE_INT8_CODE, WIDE_CODE, spread_factors

__all__ = [
    "KERNELS",
    "GraphIndex",
    "PassReport",
    "WeightStorage",
    "prepare_for_onnxruntime",
    "quantized_convs",
    "remove_unused",
    "rewrite_unfused_convs",
    "store_weights",
]

INTEGER_TYPES = (TensorProto.UINT8, TensorProto.INT8)


class GraphIndex:
    """Producers, consumers and constant values of a graph's tensors (rebuilt after each edit)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a ``Constant`` node's output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def single_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None


@dataclass
class QuantizedConv:
    """A ``Conv`` whose input and weight both come from ``DequantizeLinear`` (activation codes, int8/uint8
    weight initializer)."""

    conv: onnx.NodeProto
    x_dq: onnx.NodeProto
    w_dq: onnx.NodeProto


def _quantized_conv(index: GraphIndex, node: onnx.NodeProto) -> QuantizedConv | None:
    if node.op_type != "Conv" or len(node.input) < 2:
        return None
    x_dq, w_dq = index.producer.get(node.input[0]), index.producer.get(node.input[1])
    if (
        x_dq is None
        or w_dq is None
        or x_dq.op_type != "DequantizeLinear"
        or w_dq.op_type != "DequantizeLinear"
    ):
        return None
    if w_dq.input[0] not in index.initializers:
        return None
    x_scale = index.constant(x_dq.input[1])
    if x_scale is None or x_scale.size != 1 or len(x_dq.input) < 3 or index.constant(x_dq.input[2]) is None:
        return None
    return QuantizedConv(node, x_dq, w_dq)


def quantized_convs(model: onnx.ModelProto) -> list[QuantizedConv]:
    """Every quantized ``Conv`` of the graph (``ConvInteger`` nodes are counted separately)."""
    index = GraphIndex(model.graph)
    return [qc for node in model.graph.node if (qc := _quantized_conv(index, node)) is not None]


def _fuses(index: GraphIndex, conv: onnx.NodeProto) -> bool:
    """Whether ONNX Runtime's QDQ fusion turns this conv into ``QLinearConv``: its output goes to exactly
    one ``QuantizeLinear``, possibly through a ``Relu`` that the Q makes redundant (uint8, zero point 0)."""
    user = index.single_consumer(conv.output[0])
    if user is None:
        return False
    if user.op_type == "Relu":
        q = index.single_consumer(user.output[0])
        if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3:
            return False
        zero_point = index.constant(q.input[2])
        return zero_point is not None and zero_point.dtype == np.uint8 and int(zero_point.reshape(-1)[0]) == 0
    return user.op_type == "QuantizeLinear"


@dataclass
class PassReport:
    """What the passes changed."""

    kernels: str = "qdq"  #: the mode that ran (see :data:`KERNELS`)
    convinteger: list[str] = field(default_factory=list)  #: convs rewritten as ConvInteger (output names)
    weights: list[WeightStorage] = field(default_factory=list)  #: how each quantized weight is stored


class _Editor:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.index = GraphIndex(self.graph)
        self._names = {n.name for n in self.graph.node} | set(self.index.initializers)
        self._uint8: dict[str, str] = {}

    def fresh(self, stem: str) -> str:
        name, k = stem, 0
        while name in self._names:
            k += 1
            name = f"{stem}_{k}"
        self._names.add(name)
        return name

    def add_initializer(self, array: np.ndarray, stem: str) -> str:
        name = self.fresh(stem)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        self.index.initializers[name] = self.graph.initializer[-1]
        return name

    def uint8_weight(self, name: str) -> str:
        """An uint8 (+128) copy of the int8 weight initializer ``name`` (made once, shared)."""
        if name not in self._uint8:
            codes = numpy_helper.to_array(self.index.initializers[name])
            if codes.dtype == np.uint8:
                self._uint8[name] = name
            else:
                shifted = (codes.astype(np.int16) + 128).astype(np.uint8)
                self._uint8[name] = self.add_initializer(shifted, f"{name}_uint8")
        return self._uint8[name]


def _weight_zero_point(index: GraphIndex, w_dq: onnx.NodeProto) -> int:
    if len(w_dq.input) < 3 or not w_dq.input[2]:
        return 0
    zp = index.constant(w_dq.input[2])
    values = np.unique(zp)
    if values.size != 1:
        raise ValueError(f"weight {w_dq.input[0]}: per-channel zero points differ")
    return int(values[0])


@dataclass(frozen=True)
class WeightStorage:
    """How one quantized weight initializer is stored.

    Attributes:
        name: the initializer (the int8 codes the export wrote).
        container: ``"int8"`` or ``"uint8"`` (codes + 128, zero point 128).
        spread: the smallest and largest per-channel power of two the codes were multiplied by (their
            scales divided by it).
        max_code: the largest |code| before spreading.
    """

    name: str
    container: str
    spread: tuple[int, int]
    max_code: int


def _spread_factors(codes: np.ndarray, limit: int) -> np.ndarray:
    """Per output channel, the largest power of two ``k`` with ``k * max|code| <= limit`` (1 if none)."""
    peak = np.abs(codes.astype(np.int16)).reshape(codes.shape[0], -1).max(axis=1)
    return spread_factors(torch.from_numpy(peak), limit).numpy()


def store_weights(
    model: onnx.ModelProto, container: str = "auto", spread: bool = True
) -> list[WeightStorage]:
    """Choose each quantized conv weight's container and spread its codes (in place).

    Container: ``"auto"`` keeps int8 while every ``|code| <= 64`` (no CPU kernel can saturate on it) and
    stores wider codes as uint8 + 128; ``"int8"`` never converts (fastest on VNNI CPUs, may saturate
    without VNNI); ``"uint8"`` always converts.

    Spread: integer kernels add the bias as int32 in units of ``s_x * s_w`` (ONNX Runtime quantizes an
    fp32 bias that way, and any other bias scale stops it from fusing), so the bias is rounded to
    ``s_x * s_w``. At low bits, with a BN folded into the weight scale, that step can be a large part of
    the output step: measured on a 2-bit toy network, 9% of the sums' codes moved by one step and the
    head outputs' cosine fell to 0.96. Multiplying a channel's codes by ``k`` and dividing its scale by
    ``k`` changes no weight (``k`` is a power of two, so ``s_w / k`` is exact) and makes its bias ``k``
    times finer; ``k`` is, per output channel, the largest power of two keeping ``|k * code| <= 64``
    (int8) or ``<= 127`` (uint8): 4-bit weights (|code| <= 8) get at least 8, 2-bit ones 32. The values
    stay a b-bit grid (times ``k``).
    """
    if container not in ("auto", "int8", "uint8"):
        raise ValueError(f"weight container must be 'auto', 'int8' or 'uint8', not {container!r}")
    editor = _Editor(model)
    users: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for qc in quantized_convs(model):
        if qc.w_dq not in users[qc.w_dq.input[0]]:
            users[qc.w_dq.input[0]].append(qc.w_dq)
    stored = []
    for name, dqs in users.items():
        codes = numpy_helper.to_array(editor.index.initializers[name])
        if codes.dtype != np.int8 or any(_weight_zero_point(editor.index, dq) != 0 for dq in dqs):
            continue
        largest = int(np.abs(codes.astype(np.int16)).max(initial=0))
        wide = container == "uint8" or (container == "auto" and largest > SAFE_INT8_CODE)
        k = (
            _spread_factors(codes, WIDE_CODE if wide else SAFE_INT8_CODE)
            if spread
            else np.ones(codes.shape[0], np.int64)
        )
        stored.append(WeightStorage(name, "uint8" if wide else "int8", (int(k.min()), int(k.max())), largest))
        if not wide and (k == 1).all():
            continue
        values = codes.astype(np.int16) * k.reshape(-1, *([1] * (codes.ndim - 1)))
        array = (values + 128).astype(np.uint8) if wide else values.astype(np.int8)
        stored_name = editor.add_initializer(array, f"{name}_{'uint8' if wide else 'int8'}_spread")
        for dq in dqs:
            scale = numpy_helper.to_array(editor.index.initializers[dq.input[1]]).astype(np.float32)
            scale = np.broadcast_to(scale, k.shape) / k.astype(np.float32)  # exact: powers of two
            inputs = [stored_name, editor.add_initializer(scale, f"{dq.input[1]}_spread")]
            if wide:
                inputs.append(editor.add_initializer(np.full(k.shape, 128, np.uint8), f"{name}_zero_point"))
            del dq.input[:]
            dq.input.extend(inputs)
            if not any(a.name == "axis" for a in dq.attribute):
                dq.attribute.append(helper.make_attribute("axis", 0))
    return stored


def rewrite_unfused_convs(model: onnx.ModelProto, every_conv: bool = False) -> list[str]:
    """Rewrite every quantized conv that ONNX Runtime would not fuse (``every_conv``: every quantized conv)
    as ``ConvInteger`` + rescale + float bias.

    Returns the output names of the rewritten convs.
    """
    editor = _Editor(model)
    index = editor.index
    rewritten = []
    new_nodes: list[onnx.NodeProto] = []
    for node in list(model.graph.node):
        qc = _quantized_conv(index, node)
        if qc is None or (_fuses(index, node) and not every_conv):
            new_nodes.append(node)
            continue
        x_scale = index.constant(qc.x_dq.input[1]).astype(np.float32).reshape(())
        w_scale = index.constant(qc.w_dq.input[1]).astype(np.float32).reshape(-1)
        codes = numpy_helper.to_array(index.initializers[qc.w_dq.input[0]])
        channels = codes.shape[0]
        w_zero = _weight_zero_point(index, qc.w_dq)
        if codes.dtype == np.int8:
            weight, w_zero = editor.uint8_weight(qc.w_dq.input[0]), w_zero + 128
        else:
            weight = qc.w_dq.input[0]
        stem = node.output[0]
        w_zp = editor.add_initializer(np.uint8(w_zero), f"{stem}_w_zero_point")
        accumulator = editor.fresh(f"{stem}_int32")
        as_float = editor.fresh(f"{stem}_int32_float")
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        new_nodes.append(
            helper.make_node(
                "ConvInteger",
                [qc.x_dq.input[0], weight, qc.x_dq.input[2], w_zp],
                [accumulator],
                name=editor.fresh(f"{node.name or stem}_ConvInteger"),
                **attributes,
            )
        )
        new_nodes.append(
            helper.make_node(
                "Cast", [accumulator], [as_float], to=TensorProto.FLOAT, name=editor.fresh(f"{stem}_Cast")
            )
        )
        rescale = (
            (x_scale * np.broadcast_to(w_scale, (channels,))).astype(np.float32).reshape(1, channels, 1, 1)
        )
        scale_name = editor.add_initializer(rescale, f"{stem}_rescale")
        has_bias = len(node.input) > 2 and node.input[2]
        scaled = editor.fresh(f"{stem}_scaled") if has_bias else node.output[0]
        new_nodes.append(
            helper.make_node("Mul", [as_float, scale_name], [scaled], name=editor.fresh(f"{stem}_Mul"))
        )
        if has_bias:
            bias = index.constant(node.input[2])
            if bias is None:
                raise ValueError(f"conv {node.name or stem}: its bias is not a constant")
            bias_name = editor.add_initializer(
                bias.astype(np.float32).reshape(1, channels, 1, 1), f"{stem}_bias"
            )
            new_nodes.append(
                helper.make_node(
                    "Add", [scaled, bias_name], [node.output[0]], name=editor.fresh(f"{stem}_AddBias")
                )
            )
        rewritten.append(node.output[0])
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return rewritten


def remove_unused(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody uses (graph outputs are used) and unreferenced initializers."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


#: ``kernels`` choices: integer kernels with ONNX Runtime's fusion, integer kernels with exact float
#: biases everywhere, or the plain Q/DQ graph (for other runtimes).
KERNELS = ("fused", "exact", "qdq")


def prepare_for_onnxruntime(
    model: onnx.ModelProto, weight_container: str = "auto", spread: bool = True, kernels: str = "fused"
) -> PassReport:
    """Run the passes in place: weight storage first (a ConvInteger then converts its int8 weights).

    ``kernels="fused"``: QLinearConv wherever ONNX Runtime can fuse, ConvInteger elsewhere; QLinearConv adds
    the bias as int32 in units of ``s_x * s_w``, so an output that the float bias puts within that rounding
    of a tie may round the other way (gate 2 measures it). ``"exact"``: every quantized conv as ConvInteger
    with a float rescale and bias, which computes what the Q/DQ reference computes (slower: no requantizing
    kernel). ``"qdq"``: leave the graph as exported.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
    report = PassReport(kernels=kernels)
    if kernels == "qdq":
        return report
    report.weights = store_weights(model, weight_container, spread)
    report.convinteger = rewrite_unfused_convs(model, every_conv=kernels == "exact")
    remove_unused(model)
    return report
