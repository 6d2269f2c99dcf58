"""Per-architecture tables: the heads of each meta-architecture and the convs of each FPN-like neck.

``HEADS`` (``SCOPE: backbone``): the published recipes compare "Quantize-All" (everything) with
"Quantize-Backbone" (backbone and FPN quantized, detection heads in float);
``MODEL.QUANTIZATION.SCOPE: "backbone"`` turns into one skip rule per head prefix of the model's
meta-architecture.

``NECKS`` (``FPN_ACTIVATION``): FPN-like necks other than detectron2's ``FPN`` (whose convs are known here),
by class name, each with a function that returns the convs whose outputs ``FPN_ACTIVATION`` rectifies;
``ConvReLU``, the conv type it gives plain ``nn.Conv2d`` convs.

``INTEGER_OUTPUTS`` (``OUTPUT_QUANTIZERS``): per meta-architecture, the convs whose outputs need an 8-bit
quantizer for every quantized conv to export as an int8-out integer kernel.

Both are :class:`~model_quantization.registry.Registry` tables holding detectron2's entries and those of
:mod:`model_quantization.adelaidet` (data this module reads; nothing imports back). Contract:
``HEADS.add(name, prefixes)`` maps a meta-architecture class name to the qualified names of its head
submodules (a prefix that the built model lacks is ignored, e.g. an optional mask head);
``NECKS.add(class_name, fn)`` with ``fn(neck) -> list of nn.Conv2d``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import nn

from .. import adelaidet
from ..registry import Registry
from ..spec import Rule
from .config import SCOPES

__all__ = ["HEADS", "INTEGER_OUTPUTS", "NECKS", "SCOPES", "ConvReLU", "fpn_convs", "head_skip_rules"]

HEADS: Registry[tuple[str, ...]] = Registry("meta-architecture")
HEADS.add("RetinaNet", ("head",))
HEADS.add("GeneralizedRCNN", ("proposal_generator", "roi_heads"))
HEADS.add("ProposalNetwork", ("proposal_generator",))
for _arch, _prefixes in adelaidet.HEAD_PREFIXES.items():
    HEADS.add(_arch, _prefixes)

NECKS: Registry[Callable[[nn.Module], list[nn.Module]]] = Registry("FPN-like neck")
for _name, _convs in adelaidet.NECK_CONVS.items():
    NECKS.add(_name, _convs)


#: The backbone and FPN convs of a ResNet (basic blocks) FPN whose outputs no single quantizer takes next:
#: the stem (its output is also the first residual), each block's last conv and shortcut (before the
#: residual sum), the FPN's lateral convs (before the top-down sums), and its output convs and P6/P7, whose
#: outputs feed two head towers with quantizers of their own (and P5 or C5 the top block as well).
RESNET_FPN_OUTPUTS = (
    "backbone.bottom_up.stem.conv1",
    "backbone.bottom_up.res*.*.conv2",
    "backbone.bottom_up.res*.*.shortcut",
    "backbone.fpn_lateral*",
    "backbone.fpn_output*",
    "backbone.top_block.p*",
)
#: ``OUTPUT_QUANTIZERS`` that put every quantized conv of the project's R-18 FPN detectors on int8-out
#: integer kernels (``QLinearConv``), by meta-architecture: :data:`RESNET_FPN_OUTPUTS` plus the prediction
#: convs, and in FCOS the last conv of the (2-conv, shapes configs') box tower, which feeds both the box and
#: the centerness predictions (its quantizer acts after the tower's per-level norm). Copy an entry into a
#: config's ``MODEL.QUANTIZATION.OUTPUT_QUANTIZERS``; the export report counts the convs left on
#: ``ConvInteger``. The ``*_mixed`` configs carry RetinaNet's entry as it is and FCOS's without
#: ``bbox_pred`` and ``ctrness`` (8-bit box and centerness outputs made FCOS 4/4 lose 2.5 AP on one seed;
#: without them, 3 seeds met every target: README, "The deploy options over 3 seeds").
INTEGER_OUTPUTS: Registry[tuple[str, ...]] = Registry("meta-architecture")
INTEGER_OUTPUTS.add("RetinaNet", (*RESNET_FPN_OUTPUTS, "head.cls_score", "head.bbox_pred"))
INTEGER_OUTPUTS.add(
    "OneStageDetector",
    (
        *RESNET_FPN_OUTPUTS,
        "proposal_generator.fcos_head.bbox_tower.3",
        "proposal_generator.fcos_head.cls_logits",
        "proposal_generator.fcos_head.bbox_pred",
        "proposal_generator.fcos_head.ctrness",
    ),
)


class ConvReLU(nn.Conv2d):
    """``relu(conv(x))`` with nn.Conv2d's parameters and names (``FPN_ACTIVATION`` on P6/P7 convs).

    A type of its own, not a hook, so that export finds the ReLU by type (the deploy package registers it
    as a conv epilogue; it lives here, not in :mod:`.modeling`, so that deploy does not import modeling).
    """

    def forward(self, x):
        return F.relu(super().forward(x))


def fpn_convs(fpn: nn.Module) -> list[nn.Module]:
    """detectron2 ``FPN``: lateral and output convs, and the convs of its top block (P6/P7)."""
    convs = [*fpn.lateral_convs, *fpn.output_convs]
    # Extra levels (RetinaNet's P6/P7, FCOS's P6/P7): their outputs feed the heads too.
    if fpn.top_block is not None:
        convs += [c for c in fpn.top_block.modules() if isinstance(c, nn.Conv2d)]
    return convs


def head_skip_rules(model: nn.Module, scope: str) -> tuple[Rule, ...]:
    """Skip rules that keep the heads of ``model`` in float for ``scope == "backbone"`` (none for "all")."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "all":
        return ()
    arch = type(model).__name__
    if arch not in HEADS:
        raise ValueError(
            f"MODEL.QUANTIZATION.SCOPE: backbone: the heads of {arch} are not known; register them with "
            f"model_quantization.detectron2.architectures.HEADS.add({arch!r}, (...)) "
            f"(known: {', '.join(HEADS.names())})"
        )
    children = {name for name, _ in model.named_children()}
    return tuple(Rule(pattern=prefix, skip=True) for prefix in HEADS.get(arch) if prefix in children)
