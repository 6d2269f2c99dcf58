"""Which detectors can be deployed, and where each one is cut into the ONNX network and upstream's own code.

The ONNX graph is the *network*: pixel normalisation, backbone, FPN and head outputs per level. Everything
after it stays upstream's Python, called as the model itself calls it: detectron2's anchor generation,
box decoding and NMS (``RetinaNet.forward_inference``), AdelaiDet's FCOS decoding
(``FCOSOutputs.predict_proposals``), then detectron2's ``detector_postprocess``. Only the glue between the
network and those calls lives here (what ``DenseDetector.forward`` / ``ProposalNetwork.forward`` do around
them), so the deployed model is evaluated exactly like the PyTorch one.

Normalisation is inside the graph, so the input is the raw image. detectron2 pads *after* normalising
(with 0); the raw image is therefore padded with the pixel mean, which normalises to exactly 0.

:data:`DETECTORS` maps meta-architecture class names to adapters. Importing this module also registers
detectron2's and AdelaiDet's per-level norms and conv epilogues with :mod:`.norms` and :mod:`.lowering`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import ImageList
from torch import nn

from model_quantization.detectron2.architectures import ConvReLU
from model_quantization.registry import Registry

from .grids import ExportError
from .lowering import CONV_EPILOGUES, Epilogue
from .norms import NORM_AFFINES, batch_norm_affine

__all__ = ["DETECTORS", "DetectorAdapter", "FCOSAdapter", "RetinaNetAdapter", "adapter_for"]

# ----------------------------------------------------------------------------- upstream registrations

CONV_EPILOGUES.add(Conv2d, lambda m: Epilogue(m.norm, m.activation))
CONV_EPILOGUES.add(ConvReLU, lambda m: Epilogue(None, F.relu))


@NORM_AFFINES.register(FrozenBatchNorm2d)
def _frozen_bn(norm: FrozenBatchNorm2d):
    return [batch_norm_affine(norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)]


@NORM_AFFINES.register(CycleBatchNormList)
def _cycle_bn(norm: CycleBatchNormList):
    """detectron2's per-level BN of RetinaNet's shared head: per-level statistics, one shared affine."""
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    return [batch_norm_affine(bn.running_mean, bn.running_var, bn.eps, weight, bias) for bn in norm]


try:  # AdelaiDet's per-level BN of FCOS's shared towers (a list of BNs, cycled call by call)
    from adet.modeling.fcos.fcos import ModuleListDial
except ImportError:  # pragma: no cover - AdelaiDet is part of every build
    ModuleListDial = None
else:

    @NORM_AFFINES.register(ModuleListDial)
    def _dial_bn(norm):
        affines = []
        for bn in norm:
            found = NORM_AFFINES.for_type(type(bn))
            if found is None:
                raise ValueError(f"its level norm {type(bn).__name__} cannot be folded")
            affines += found(bn)
        return affines


# ----------------------------------------------------------------------------- adapters

#: meta-architecture class name -> adapter class.
DETECTORS: Registry[type[DetectorAdapter]] = Registry("deployable meta-architecture")


class DetectorAdapter:
    """How one meta-architecture is cut: the network, its outputs, and upstream's pre/post-processing.

    Args:
        model: the built detector (quantized or float). Its weights are used by :meth:`network` (export);
            pre/post-processing use only its configuration (pixel mean/std, anchors, thresholds).
    """

    #: what the error message calls it
    description: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # -- the network -------------------------------------------------------------------------------

    def network(self) -> nn.Module:
        """``image (N, 3, H, W) raw, padded with the pixel mean -> tuple of head outputs``."""
        raise NotImplementedError

    def output_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def size_divisibility(self) -> int:
        return max(int(self.model.backbone.size_divisibility), 1)

    def example_input(self) -> torch.Tensor:
        """A tracing input: batch 2, two size-divisibility blocks per side (sizes 0/1 would specialise)."""
        side = 2 * self.size_divisibility
        return torch.rand(2, 3, side, side) * 255.0

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        """Batch, and height/width in multiples of the backbone's size divisibility."""
        dim = torch.export.Dim
        block = self.size_divisibility
        limit = max(2, 4096 // block)
        return (
            {
                0: dim("batch", min=1, max=64),
                2: block * dim("h_blocks", max=limit),
                3: block * dim("w_blocks", max=limit),
            },
        )

    # -- upstream's pre/post-processing ------------------------------------------------------------

    def preprocess(self, batched_inputs: Sequence[dict]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Raw images of a detectron2 batch, padded like ``ImageList.from_tensors`` pads them, with the
        pixel mean (the graph normalises: padded pixels become exactly 0, as detectron2's are)."""
        model = self.model
        images = [x["image"].to(torch.float32) for x in batched_inputs]
        constraints = getattr(model.backbone, "padding_constraints", None)
        batch = ImageList.from_tensors(images, self.size_divisibility, padding_constraints=constraints)
        tensor = batch.tensor.clone()
        mean = model.pixel_mean.to(tensor)
        for i, (h, w) in enumerate(batch.image_sizes):
            tensor[i, :, h:, :] = mean
            tensor[i, :, :, w:] = mean
        return tensor, [tuple(s) for s in batch.image_sizes]

    def postprocess(
        self,
        outputs: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        batched_inputs: Sequence[dict],
    ) -> list[dict]:
        raise NotImplementedError

    @staticmethod
    def _levels(outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Shape-only stand-ins for the feature maps (anchors and locations need only their sizes)."""
        return [torch.empty((o.shape[0], 0, *o.shape[-2:])) for o in outputs]

    @staticmethod
    def _rescale(results, image_sizes, batched_inputs) -> list:
        """detectron2's ``detector_postprocess`` to each input's requested size (as the models do)."""
        rescaled = []
        for result, size, inputs in zip(results, image_sizes, batched_inputs, strict=True):
            rescaled.append(
                detector_postprocess(result, inputs.get("height", size[0]), inputs.get("width", size[1]))
            )
        return rescaled


class _Normalize(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", model.pixel_mean.detach().clone(), persistent=False)
        self.register_buffer("pixel_std", model.pixel_std.detach().clone(), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.pixel_mean) / self.pixel_std


class RetinaNetNetwork(nn.Module):
    """RetinaNet's network: normalise, backbone + FPN, shared head; outputs logits then deltas per level."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.normalize = _Normalize(model)
        self.backbone = model.backbone
        self.head = model.head
        self.in_features = list(model.head_in_features)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone(self.normalize(image))
        logits, deltas = self.head([features[f] for f in self.in_features])
        return (*logits, *deltas)


@DETECTORS.register("RetinaNet")
class RetinaNetAdapter(DetectorAdapter):
    """detectron2's RetinaNet: anchors, box decoding and NMS from ``RetinaNet.forward_inference``."""

    description = "RetinaNet (detectron2)"

    def network(self) -> nn.Module:
        return RetinaNetNetwork(self.model)

    def output_names(self) -> list[str]:
        features = self.model.head_in_features
        return [f"logits_{f}" for f in features] + [f"anchor_deltas_{f}" for f in features]

    def postprocess(self, outputs, image_sizes, batched_inputs):
        n = len(self.model.head_in_features)
        logits, deltas = list(outputs[:n]), list(outputs[n : 2 * n])
        images = ImageList(torch.empty(0), list(image_sizes))
        results = self.model.forward_inference(images, self._levels(logits), [logits, deltas])
        return [{"instances": r} for r in self._rescale(results, image_sizes, batched_inputs)]


class FCOSNetwork(nn.Module):
    """FCOS's network: normalise, backbone + FPN, FCOS head; outputs logits, box regression, centerness."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.normalize = _Normalize(model)
        self.backbone = model.backbone
        self.proposal_generator = model.proposal_generator
        self.in_features = list(model.proposal_generator.in_features)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone(self.normalize(image))
        features = [features[f] for f in self.in_features]
        logits, reg, ctrness, _, _ = self.proposal_generator.fcos_head(features, None, False)
        return (*logits, *reg, *ctrness)


@DETECTORS.register("OneStageDetector")
class FCOSAdapter(DetectorAdapter):
    """AdelaiDet's FCOS (``OneStageDetector``): decoding and NMS from ``FCOSOutputs.predict_proposals``."""

    description = "FCOS (AdelaiDet's OneStageDetector with the FCOS proposal generator)"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        generator = getattr(model, "proposal_generator", None)
        if type(generator).__name__ != "FCOS":
            raise ExportError(
                f"cannot export this OneStageDetector: its proposal generator is {type(generator).__name__}, "
                f"and only FCOS is supported"
            )
        if generator.yield_proposal or generator.yield_box_feats:
            raise ExportError("cannot export an FCOS that yields proposals or box features to another head")

    def network(self) -> nn.Module:
        return FCOSNetwork(self.model)

    def output_names(self) -> list[str]:
        features = self.model.proposal_generator.in_features
        return [f"{kind}_{f}" for kind in ("logits", "bbox_reg", "ctrness") for f in features]

    def postprocess(self, outputs, image_sizes, batched_inputs):
        fcos = self.model.proposal_generator
        n = len(fcos.in_features)
        logits, reg, ctrness = list(outputs[:n]), list(outputs[n : 2 * n]), list(outputs[2 * n : 3 * n])
        locations = fcos.compute_locations(self._levels(logits))
        results = fcos.fcos_outputs.predict_proposals(logits, reg, ctrness, locations, list(image_sizes), [])
        return [{"instances": r} for r in self._rescale(results, image_sizes, batched_inputs)]


def adapter_for(model: nn.Module) -> DetectorAdapter:
    """The adapter of ``model``'s meta-architecture, or :class:`ExportError` naming what is supported."""
    name = type(model).__name__
    if name not in DETECTORS:
        supported = "; ".join(DETECTORS.get(n).description for n in DETECTORS.names())
        raise ExportError(
            f"cannot export a {name}: deployment supports {supported}. Two-stage and mask models (Faster/Mask "
            f"R-CNN, BlendMask, CondInst) are not supported yet"
        )
    return DETECTORS.get(name)(model)
