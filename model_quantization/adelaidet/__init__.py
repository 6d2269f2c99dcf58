"""AdelaiDet integration: the head submodules of its detectors, for ``MODEL.QUANTIZATION.SCOPE``.

Everything else AdelaiDet needs works through the detectron2 integration: its configs clone detectron2's
defaults (so ``MODEL.QUANTIZATION`` is there in either import order), its models are built by the hooked
``build_model``, FCOS/BlendMask/CondInst towers are plain convs with per-level BN available upstream
(``MODEL.FCOS.NORM: "BN"``), FPN-BN covers its P6/P7 top blocks, and CondInst's generated mask-head
weights are quantized through :class:`model_quantization.nn.DynamicConv2d` (patched into its mask head).
Importing this module needs no AdelaiDet.
"""

from __future__ import annotations

from ..detectron2.heads import HEADS

#: FCOS-based detectors: the FCOS head is the proposal generator; instance-mask models add their branches.
HEADS.register("OneStageDetector", ("proposal_generator",))
HEADS.register("BlendMask", ("proposal_generator", "basis_module", "blender", "top_layer"))
HEADS.register("CondInst", ("proposal_generator", "mask_branch", "mask_head", "controller"))
