"""Output quantizers: an 8-bit quantizer on the output of chosen quantized convolutions.

An integer runtime runs a quantized conv fastest when its output is requantized to 8 bits at once (ONNX
Runtime's ``QLinearConv``: int8 in, int8 out). Where a detector's conv output is *not* quantized next (the
conv before a residual sum, an FPN lateral conv, the prediction convs whose outputs are the network's),
the export has to keep the int32 result in float (``ConvInteger`` + rescale), which ONNX Runtime runs about
4x slower per multiply-add than ``QLinearConv`` (measured on the COCO RetinaNet R-18 graph: 26 such convs took
57% of its time). :func:`attach_output_quantizers` gives such convs an 8-bit ``output_quantizer``, applied to
what the conv module returns (after its own norm and activation, e.g. detectron2's ``Conv2d``), in training
and evaluation alike, so the export can emit ``QLinearConv`` and still compute what the model computes.

Contract: the quantizer is a child module named ``output_quantizer`` (so it is in the state dict, in
``QuantizedModule.quantizers()``, in the DDP initialisation and the grid checks like every other quantizer)
and a forward hook applies it: on the conv, or on the norm that follows it as a separate module and folds
into it at export (the caller says which; ``conv.output_after_next`` records it); the export handler of
``QConv2d`` reads both. Its recipe is the model's activation recipe at 8 bits (steps initialised by least
squared error, see :data:`OUTPUT_INIT_METHOD`), signed (conv outputs before a sum or a prediction are
signed), or unsigned for a conv whose output ends with a ReLU (the caller says which: ONNX Runtime drops a
ReLU into the requantization only for an unsigned output with zero point 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from model_quantization.nn.layers import QConv2d
from model_quantization.quantizers import QUANTIZERS, QuantizerRecipe, build_quantizer
from model_quantization.spec import Rule

__all__ = ["OUTPUT_BITS", "OUTPUT_INIT_METHOD", "attach_output_quantizers", "output_recipe"]

#: Bits of every output quantizer: what 8-bit integer kernels write.
OUTPUT_BITS = 8


#: How an output quantizer's step is initialised from data, where its method has that option (LSQ):
#: least squared error. LSQ's ``2 mean|x| / sqrt(Qp)`` suits 2-4 bits; at 8 bits it spreads the grid over
#: ~22 mean|x|, and in a short fine-tune the step hardly moves from there. Measured on a trained FCOS R-18
#: 4/4 (seed 1, INTEGER_BIAS + OUTPUT_QUANTIZERS, 800 iterations): its output steps had 3-150x the squared
#: error of the least-squares step (the prediction convs' worst: a classification logit step of 0.74), and
#: setting them to least-squares steps, without training, raised its box AP from 65.0 to 67.4.
OUTPUT_INIT_METHOD = "mse"


def output_recipe(activation: QuantizerRecipe, where: str, signed: bool = True) -> QuantizerRecipe:
    """The output quantizers' recipe: ``activation``'s method and options at 8 bits, with steps initialised
    by least squared error where the method has an ``init_method`` (validated)."""
    options = dict(activation.options)
    if any(f.name == "init_method" for f in dataclasses.fields(QUANTIZERS.get(activation.method).Options)):
        options["init_method"] = OUTPUT_INIT_METHOD
    recipe = dataclasses.replace(activation, bits=OUTPUT_BITS, signed=signed, options=options)
    recipe.validate("activation", where)
    return recipe


class _QuantizeOutput:
    """Forward hook: ``conv``'s output quantizer on the output of the module it is registered on."""

    def __init__(self, conv: nn.Module) -> None:
        self.conv = conv  # a deep copy of the model copies the hook with its own conv (deepcopy's memo)

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return self.conv.output_quantizer(output)


def attach_output_quantizers(
    model: nn.Module,
    patterns: Sequence[str],
    activation: QuantizerRecipe,
    where: str = "output quantizers",
    rectified: Callable[[str, nn.Module], bool] | None = None,
    placement: Callable[[str, nn.Module], nn.Module] | None = None,
) -> list[str]:
    """Give every quantized conv matched by ``patterns`` an 8-bit output quantizer.

    Args:
        model: a converted model.
        patterns: globs on qualified module names, matched like the spec's rules (a name or an ancestor's).
        activation: the model's activation recipe (method and options of the new quantizers).
        where: the setting's name, for errors.
        rectified: ``(name, conv) -> True`` when the conv's output ends with a ReLU (it gets an unsigned
            quantizer); None: every output is signed.
        placement: ``(name, conv) ->`` the module whose output the quantizer takes: the conv, or the norm
            that follows it as a separate module (folded into the conv at export); None: the conv.

    Returns:
        The qualified names of the convs that got one, in model order.

    Raises:
        ValueError: naming the pattern, for a pattern that matches no quantized conv; naming the setting,
            for an activation method that cannot quantize signed values.
    """
    recipes = {signed: output_recipe(activation, where, signed) for signed in (True, False)}
    rules = [Rule(pattern=p, skip=True) for p in patterns]
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, QConv2d)]
    matched: dict[str, list[str]] = {p: [] for p in patterns}
    attached = []
    for name, conv in convs:
        hits = [rule.pattern for rule in rules if rule.matches(name)]
        for pattern in hits:
            matched[pattern].append(name)
        if not hits or hasattr(conv, "output_quantizer"):
            continue
        recipe = recipes[not (rectified is not None and rectified(name, conv))]
        quantizer = build_quantizer(recipe, "activation", owner=f"{name} (output)")
        conv.output_quantizer = quantizer.to(conv.weight.device)
        target = conv if placement is None else placement(name, conv)
        target.register_forward_hook(_QuantizeOutput(conv))
        conv.output_after_next = target is not conv  # where it acts, for the export
        attached.append(name)
    unmatched = [p for p, names in matched.items() if not names]
    if unmatched:
        known = ", ".join(name for name, _ in convs[:8]) + (", ..." if len(convs) > 8 else "")
        raise ValueError(f"{where}: {unmatched[0]!r} matches no quantized conv (quantized convs: {known})")
    return attached
