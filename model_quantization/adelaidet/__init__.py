"""AdelaiDet's entries in the per-architecture tables: the heads of its detectors and its BiFPN neck.

Everything else AdelaiDet needs works through the detectron2 integration: its configs clone detectron2's
defaults (so ``MODEL.QUANTIZATION`` is there in either import order), its models are built by the hooked
``build_model``, FCOS/BlendMask/CondInst towers are plain convs with per-level BN available upstream
(``MODEL.FCOS.NORM: "BN"``), FPN-BN covers its P6/P7 top blocks, and CondInst's generated mask-head
weights are quantized through :class:`model_quantization.nn.DynamicConv2d` (patched into its mask head).
The patch series also turns BiFPN's weighted fusions into :class:`~model_quantization.nn.WeightedAdd`
modules and the residual sums of DLA, VoVNet, MobileNetV2 and ResNet-LPF into ``Add`` modules.

This module holds data only and imports neither AdelaiDet nor the detectron2 integration, which reads it
(:mod:`model_quantization.detectron2.architectures`): the dependency goes one way.
"""

from __future__ import annotations

from torch import nn

__all__ = ["HEAD_PREFIXES", "NECK_CONVS", "bifpn_convs"]

#: Meta-architecture class name -> the qualified names of its head submodules (``SCOPE: backbone``).
#: FCOS-based detectors: the FCOS head is the proposal generator; instance-mask models add their branches.
HEAD_PREFIXES: dict[str, tuple[str, ...]] = {
    "OneStageDetector": ("proposal_generator",),
    "BlendMask": ("proposal_generator", "basis_module", "blender", "top_layer"),
    "CondInst": ("proposal_generator", "mask_branch", "mask_head", "controller"),
}


def bifpn_convs(bifpn: nn.Module) -> list[nn.Module]:
    """The convs of AdelaiDet's ``BiFPN`` whose outputs ``FPN_ACTIVATION`` rectifies.

    Every lateral and output conv of every repeat, and the reduction convs that make the extra top levels
    (P6/P7) from the bottom-up backbone, which stays as it is. With a ReLU after each of them every input
    of a fusion is non-negative, hence every fused node, its swish (non-negative for non-negative inputs)
    and the BiFPN's outputs: unsigned activation quantizers fit everywhere, as in an FPN-BN.
    """
    convs = [m for m in bifpn.repeated_bifpn.modules() if isinstance(m, nn.Conv2d)]
    for name, top_level in bifpn.bottom_up.named_children():
        if name != "backbone":
            convs += [m for m in top_level.modules() if isinstance(m, nn.Conv2d)]
    return convs


#: FPN-like neck class name -> the convs ``FPN_ACTIVATION`` rectifies.
NECK_CONVS = {"BiFPN": bifpn_convs}
