"""Parity gates: the ONNX graph against the fake-quant model, and ONNX Runtime's integer engine against it.

* Gate 1, reference parity (:func:`reference_parity`): ONNX Runtime with every optimisation off runs the
  Q/DQ graph as written (float convs on dequantized values, i.e. the fake-quant arithmetic). Every
  quantized activation (the debug export returns each Q/DQ output as an extra graph output) must equal the
  fake-quant model's to within one step of its grid, **given the same inputs**: the PyTorch model runs
  teacher-forced, each quantizer's output replaced by ONNX Runtime's before the next layer sees it. Two
  float libraries add in different orders, so a value within ~1e-6 of a rounding boundary may round the
  other way (the one step allowed); in a deep low-bit network such a flip also moves later layers'
  values across their boundaries (measured: one flip in a random-init FCOS grew to 7 steps four stages
  later). That cascade is a property of the model, not of the export, so it is reported (free-running
  figures) but does not decide the gate; the head outputs' largest difference is reported both ways.
* Gate 2, engine parity (:func:`engine_parity`): ONNX Runtime with all optimisations (QLinearConv,
  ConvInteger) against the reference session: cosine similarity >= 0.999 for every head output.
  QLinearConv adds biases as int32 in units of ``s_x * s_w``; outputs within that rounding of a tie round
  the other way and propagate, so this is statistical (with biases on the int32 grid it is exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from torch import nn

from model_quantization.quantizers import Quantizer

from .grids import ActivationQDQ
from .runtime import make_session

__all__ = [
    "CodeDivergence",
    "EngineParity",
    "ReferenceParity",
    "engine_divergence",
    "engine_parity",
    "reference_parity",
    "with_codes_as_outputs",
    "without_conv_biases",
]

#: Gate thresholds (the issue's): every activation within one step; cosine of every head output.
MAX_STEPS = 1.0
MIN_COSINE = 0.999
_TOLERANCE = 1e-3  # of a step: float noise in (codes - zero point) * scale


@dataclass
class StepStats:
    """|ONNX - PyTorch| over quantized activations, in steps of each one's grid."""

    activations: int = 0
    elements: int = 0
    max_steps: float = 0.0
    over: int = 0  #: elements more than :data:`MAX_STEPS` apart
    differing: int = 0  #: elements that differ at all
    worst: str = "-"

    def add(self, name: str, steps: np.ndarray) -> None:
        worst = float(steps.max()) if steps.size else 0.0
        self.activations += 1
        self.elements += steps.size
        self.over += int((steps > MAX_STEPS + _TOLERANCE).sum())
        self.differing += int((steps > _TOLERANCE).sum())
        if worst > self.max_steps or self.worst == "-":
            self.max_steps, self.worst = max(worst, self.max_steps), name


@dataclass
class ReferenceParity:
    """Gate 1 figures.

    Attributes:
        images: inputs compared.
        forced: per-layer comparison (PyTorch teacher-forced with ONNX Runtime's activations): the gate.
        free: end-to-end comparison (both run on their own): reported.
        head_max_abs_diff: per head output, largest |ONNX - PyTorch|, teacher-forced.
        head_max_abs_diff_free: the same, free-running.
    """

    images: int
    forced: StepStats = field(default_factory=StepStats)
    free: StepStats = field(default_factory=StepStats)
    head_max_abs_diff: dict[str, float] = field(default_factory=dict)
    head_max_abs_diff_free: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.forced.over == 0

    @property
    def max_steps(self) -> float:
        return self.forced.max_steps

    @property
    def activations(self) -> int:
        return self.forced.activations

    def __str__(self) -> str:
        f, g = self.forced, self.free
        head = max(self.head_max_abs_diff.values(), default=0.0)
        head_free = max(self.head_max_abs_diff_free.values(), default=0.0)
        return (
            f"{'PASS' if self.passed else 'FAIL'}: {f.activations} quantized activations ({f.elements} values, "
            f"{self.images} images) given the same inputs: max {f.max_steps:g} step(s), {f.differing} values "
            f"differ, {f.over} by more than one step (worst {f.worst}); head outputs max |diff| {head:.3g}. "
            f"Free-running: max {g.max_steps:g} step(s), {g.differing} values differ, {g.over} by more than one "
            f"step; head outputs max |diff| {head_free:.3g}"
        )


def _activation_quantizers(network: nn.Module) -> list[tuple[str, Quantizer]]:
    return [
        (name, m)
        for name, m in network.named_modules()
        if isinstance(m, Quantizer) and m.enabled and m.role == "activation"
    ]


def _run_torch(network: nn.Module, image: torch.Tensor, forced: dict[str, np.ndarray] | None):
    """Run ``network``; return (head outputs, {tap name: PyTorch's own quantizer output}).

    With ``forced`` (tap name -> ONNX Runtime's value), each quantizer's output is replaced by ONNX
    Runtime's once recorded, so every layer sees the inputs ONNX Runtime's layer saw.
    """
    own: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    handles = []
    for name, quantizer in _activation_quantizers(network):

        def hook(module, args, out, name=name):
            call = calls.get(name, 0)
            calls[name] = call + 1
            tap = f"{name}#{call}"
            own[tap] = out.detach().clone()
            if forced is not None and tap in forced:
                # a copy: the model may modify it in place (detectron2's blocks apply F.relu_ to the sum)
                return torch.from_numpy(forced[tap].copy()).to(out)
            return None

        handles.append(quantizer.register_forward_hook(hook))
    try:
        heads = network(image)
    finally:
        for handle in handles:
            handle.remove()
    return heads, own


@torch.no_grad()
def reference_parity(
    network: nn.Module,
    debug_model: onnx.ModelProto,
    head_names: Sequence[str],
    activations: Sequence[ActivationQDQ],
    images: Sequence[torch.Tensor],
    threads: int | None = 1,
) -> ReferenceParity:
    """Gate 1: every Q/DQ output and head output of the debug export against the fake-quant network.

    Args:
        network: the fake-quant network that was exported (eval mode), returning the head outputs.
        debug_model: its debug export: head outputs, then one output per Q/DQ call (``<quantizer>#<k>``).
        head_names: the graph's head output names.
        activations: the lowered activation quantizers (their steps).
        images: network inputs, one tensor per run.
    """
    session = make_session(debug_model, optimize=False, threads=threads)
    names = [o.name for o in session.get_outputs()]
    steps = {a.name: (2.0 if a.sign else 1.0) * a.scale for a in activations}
    input_name = session.get_inputs()[0].name
    result = ReferenceParity(len(images))
    network.eval()
    for image in images:
        outputs = dict(zip(names, session.run(None, {input_name: image.numpy()}), strict=True))
        taps = {name: outputs[name] for name in names[len(head_names) :]}
        for stats, heads_diff, forced in (
            (result.forced, result.head_max_abs_diff, taps),
            (result.free, result.head_max_abs_diff_free, None),
        ):
            heads, own = _run_torch(network, image, forced)
            for name, expected in zip(head_names, heads, strict=True):
                diff = float(np.abs(outputs[name] - expected.numpy()).max()) if expected.numel() else 0.0
                heads_diff[name] = max(heads_diff.get(name, 0.0), diff)
            for tap, value in taps.items():
                if tap not in own:
                    raise AssertionError(f"the ONNX graph has {tap}; the PyTorch model made no such call")
                stats.add(tap, np.abs(value - own[tap].numpy()) / steps[tap.rsplit("#", 1)[0]])
    return result


@dataclass
class CodeDivergence:
    """One activation quantizer's integer codes, fused engine against reference, over the compared images."""

    quantizer: str  #: e.g. ``backbone.bottom_up.stem.conv1.output`` (the module and which side of it)
    differing: int  #: codes that differ
    codes: int
    max_steps: int  #: largest |engine - reference| in steps of its grid

    @property
    def fraction(self) -> float:
        return self.differing / self.codes if self.codes else 0.0


@dataclass
class EngineParity:
    """Gate 2 figures: per head output, cosine and max |diff| of the engine against the reference.

    ``divergence`` (measured only when the gate fails): every activation quantizer's codes in graph order,
    engine against reference, so a failure says where the two part ways (a few codes that round the other
    way and multiply layer by layer, or one layer that is simply wrong)."""

    images: int
    cosine: dict[str, float] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    divergence: list[CodeDivergence] = field(default_factory=list)

    @property
    def min_cosine(self) -> float:
        return min(self.cosine.values(), default=1.0)

    @property
    def passed(self) -> bool:
        return self.min_cosine >= MIN_COSINE

    def __str__(self) -> str:
        worst = min(self.cosine, key=self.cosine.get) if self.cosine else "-"
        text = (
            f"{'PASS' if self.passed else 'FAIL'}: min cosine {self.min_cosine:.6f} over {len(self.cosine)} head "
            f"outputs ({self.images} images; worst {worst}), max |diff| {max(self.max_abs_diff.values(), default=0):.3g}"
        )
        differing = [d for d in self.divergence if d.differing]
        if differing:
            first, most = differing[0], max(differing, key=lambda d: d.fraction)
            text += (
                f"; integer codes first differ at {first.quantizer} ({first.differing} of {first.codes}, up to "
                f"{first.max_steps} step(s)), most at {most.quantizer} ({100 * most.fraction:.1f}%, up to "
                f"{most.max_steps}); {len(differing)} of {len(self.divergence)} quantized activations differ"
            )
        return text


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm = math.sqrt(float(a @ a) * float(b @ b))
    if norm == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(a @ b) / norm


def _paired_outputs(model: onnx.ModelProto | bytes, images: Sequence[torch.Tensor], threads: int | None):
    """(output name, reference value, engine value) for every graph output and image: ``ORT_DISABLE_ALL``
    (the Q/DQ reference) and ``ORT_ENABLE_ALL`` (integer kernels) on the same inputs."""
    reference = make_session(model, optimize=False, threads=threads)
    engine = make_session(model, optimize=True, threads=threads)
    names = [o.name for o in reference.get_outputs()]
    input_name = reference.get_inputs()[0].name
    for image in images:
        feed = {input_name: image.numpy()}
        yield from zip(names, reference.run(None, feed), engine.run(None, feed), strict=True)


def engine_parity(
    model: onnx.ModelProto | bytes, images: Sequence[torch.Tensor], threads: int | None = 1
) -> EngineParity:
    """Gate 2: ``ORT_ENABLE_ALL`` (integer kernels) against ``ORT_DISABLE_ALL`` on the same inputs."""
    result = EngineParity(len(images))
    collected: dict[str, tuple[list, list]] = {}
    for name, ref, eng in _paired_outputs(model, images, threads):
        refs, engs = collected.setdefault(name, ([], []))
        refs.append(ref.ravel())
        engs.append(eng.ravel())
    for name, (ref, eng) in collected.items():
        ref, eng = np.concatenate(ref), np.concatenate(eng)
        result.cosine[name] = _cosine(ref, eng)
        result.max_abs_diff[name] = float(np.abs(ref - eng).max()) if ref.size else 0.0
    if not result.passed:
        result.divergence = engine_divergence(model, images, threads)
    return result


_QDQ_SCALE = "_qdq.scale"  # the exporter's scale initialisers: ``network.<module>.<input|output>_qdq.scale``


def with_codes_as_outputs(model: onnx.ModelProto | bytes) -> onnx.ModelProto:
    """A copy of ``model`` whose every QuantizeLinear output (integer codes) is also a graph output.

    A fused node still produces its QuantizeLinear's tensor, so ONNX Runtime fuses as in the deployed graph
    (a test checks that the head outputs stay the same)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(onnx.load_model_from_string(model) if isinstance(model, bytes) else model)
    present = {o.name for o in copy.graph.output}
    for node in copy.graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] not in present:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.output[0]))
    return copy


def engine_divergence(
    model: onnx.ModelProto | bytes, images: Sequence[torch.Tensor], threads: int | None = 1
) -> list[CodeDivergence]:
    """Every QuantizeLinear's codes, ``ORT_ENABLE_ALL`` against ``ORT_DISABLE_ALL``, in graph order."""
    probe = with_codes_as_outputs(model)
    quantize = [n for n in probe.graph.node if n.op_type == "QuantizeLinear"]
    counts: dict[str, list[int]] = {n.output[0]: [0, 0, 0] for n in quantize}
    for name, ref, eng in _paired_outputs(probe.SerializeToString(), images, threads):
        if name in counts:
            steps = np.abs(ref.astype(np.int64) - eng.astype(np.int64))
            count = counts[name]
            count[0] += int(np.count_nonzero(steps))
            count[1] += steps.size
            count[2] = max(count[2], int(steps.max()) if steps.size else 0)
    return [CodeDivergence(_quantizer_name(node), *counts[node.output[0]]) for node in quantize]


def _quantizer_name(node: onnx.NodeProto) -> str:
    scale = node.input[1]
    if scale.endswith(_QDQ_SCALE):
        return scale[: -len(_QDQ_SCALE)].removeprefix("network.")
    return node.output[0]


def without_conv_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose quantized convs have zero biases: the probe for exact integer kernels.

    Engine parity is statistical only because QLinearConv rounds biases to int32; with every bias 0 (on
    any grid) the integer engine must reproduce the reference bit for bit, so any other discrepancy (zero
    points, containers, saturation, a wrong fusion) shows as a nonzero difference.
    """
    from onnx import numpy_helper

    from .onnx_passes import GraphIndex, quantized_convs

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    index = GraphIndex(copy.graph)
    names = [qc.conv.input[2] for qc in quantized_convs(copy) if len(qc.conv.input) > 2 and qc.conv.input[2]]
    for node in copy.graph.node:
        if node.op_type != "ConvInteger":
            continue
        cast = index.single_consumer(node.output[0])
        mul = cast and index.single_consumer(cast.output[0])
        add = mul and index.single_consumer(mul.output[0])
        if add is not None and add.op_type == "Add":
            names += [name for name in add.input if name in index.initializers]
    for name in names:
        tensor = index.initializers[name]
        tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(tensor)), name))
    return copy
