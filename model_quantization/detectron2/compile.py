"""``MODEL.QUANTIZATION.COMPILE``: ``torch.compile`` the dense part of a detector (backbone, FPN, head towers).

What is compiled is, per meta-architecture (:data:`UNITS`), the submodules whose forward is dense tensor code
on the feature maps: the backbone with its FPN and the convolutional head towers. The rest of the
meta-architecture (pre-processing, anchor matching, losses, post-processing, ROI pooling of proposals)
branches on data (``nonzero``, per-image loops, sorting by score) and stays eager; compiling it would only
add graph breaks and recompilations. An architecture that is not in the table has its ``backbone`` compiled.

The option works with quantization off too (a compiled float model is the baseline of the benchmark). The
units are compiled with :func:`model_quantization.compilation.compile_modules`: eager on the first batch
(data-driven quantizer initialisation, all-reduced under DDP), compiled from the second on; if compilation
fails the model runs eagerly with one warning naming the cause. The state dict, checkpoints and forward
hooks are unchanged.
"""

from __future__ import annotations

import logging

from torch import nn

from ..compilation import CompileGroup, compile_modules
from ..registry import Registry

__all__ = ["UNITS", "compile_detector", "compile_units"]

logger = logging.getLogger(__name__)

#: Meta-architecture class name -> qualified names of the submodules to compile (absent ones are ignored,
#: e.g. a mask head a config does not build). AdelaiDet's FCOS family: the FCOS head is the proposal
#: generator's ``fcos_head``; BlendMask's basis module and CondInst's mask branch compute their losses
#: inside forward and stay eager.
UNITS: Registry[tuple[str, ...]] = Registry("meta-architecture")
UNITS.add("RetinaNet", ("backbone", "head"))
UNITS.add("GeneralizedRCNN", ("backbone", "proposal_generator.rpn_head", "roi_heads.box_head"))
UNITS.add("ProposalNetwork", ("backbone", "proposal_generator.rpn_head"))
for _arch in ("OneStageDetector", "BlendMask", "CondInst"):
    UNITS.add(_arch, ("backbone", "proposal_generator.fcos_head"))


def compile_units(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> submodule of ``model`` that :func:`compile_detector` compiles."""
    arch = type(model).__name__
    names = UNITS.get(arch) if arch in UNITS else ("backbone",)
    modules = dict(model.named_modules())
    units = {name: modules[name] for name in names if name in modules}
    if not units:
        raise ValueError(
            f"MODEL.QUANTIZATION.COMPILE: {arch} has none of the submodules to compile ({', '.join(names)}); "
            f"register them with model_quantization.detectron2.compile.UNITS.add({arch!r}, (...))"
        )
    return units


def compile_detector(model: nn.Module) -> CompileGroup:
    """Compile the units of ``model`` in place (after the first batch; eager fallback on failure)."""
    units = compile_units(model)
    group = compile_modules(units)
    model.compile_group = group
    logger.info(
        "MODEL.QUANTIZATION.COMPILE: torch.compile (%s) of %s from the second batch on (the first initialises "
        "the quantizers eagerly)",
        group.backend if isinstance(group.backend, str) else "custom backend",
        ", ".join(units),
    )
    return group
