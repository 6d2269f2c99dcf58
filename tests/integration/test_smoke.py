"""The patched tree imports, and a RetinaNet R-18 (detectron2) and an FCOS R-18 (AdelaiDet) built from the
upstream configs train one step and run inference on the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 128


def _r18(cfg) -> None:
    """Shrink an upstream R-50 config to an untrained R-18 at 128 px on the CPU (no weights download)."""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.INPUT.MIN_SIZE_TEST = IMAGE_SIZE
    cfg.INPUT.MAX_SIZE_TEST = IMAGE_SIZE


def _batch(num_classes: int, seed: int = 0) -> list[dict]:
    from detectron2.structures import Boxes, Instances

    generator = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(2):
        image = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 255
        xy = torch.rand(3, 2, generator=generator) * IMAGE_SIZE * 0.6
        wh = 16 + torch.rand(3, 2, generator=generator) * IMAGE_SIZE * 0.3
        instances = Instances((IMAGE_SIZE, IMAGE_SIZE))
        instances.gt_boxes = Boxes(torch.cat([xy, (xy + wh).clamp(max=IMAGE_SIZE - 1)], dim=1))
        instances.gt_classes = torch.randint(num_classes, (3,), generator=generator)
        batch.append({"image": image, "instances": instances, "height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return batch


def _train_step_and_infer(
    model, num_classes: int, max_detections: int, idle: frozenset[str] = frozenset()
) -> dict[str, float]:
    """One SGD step (every trainable parameter but `idle` must move), then inference on new images."""
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    model.train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with EventStorage(0):  # detectron2's training forward logs into the current storage
        losses = model(_batch(num_classes))
    total = sum(losses.values())
    assert math.isfinite(total.item()), losses
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    unchanged = sorted(k for k in trainable if torch.equal(dict(model.named_parameters())[k], before[k]))
    assert not set(unchanged) - idle, f"trainable parameters that did not move: {unchanged}"
    assert any(k.startswith("backbone.bottom_up.res5") for k in trainable), "backbone is not trained"

    model.eval()
    with torch.no_grad():
        outputs = model(
            [{k: v for k, v in x.items() if k != "instances"} for x in _batch(num_classes, seed=1)]
        )
    assert len(outputs) == 2
    for output in outputs:
        instances = output["instances"]
        assert instances.image_size == (IMAGE_SIZE, IMAGE_SIZE)
        assert len(instances) <= max_detections
        assert {"pred_boxes", "scores", "pred_classes"} <= set(instances.get_fields())
        if len(instances):
            assert int(instances.pred_classes.max()) < num_classes
    return {k: float(v) for k, v in losses.items()}


def test_retinanet_r18_from_upstream_config_trains_and_infers(patched_tree) -> None:
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    # model_zoo.get_config_file is the code path the detectron2 patch repairs (no pkg_resources).
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    _r18(cfg)
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    model = build_model(cfg)
    assert type(model).__name__ == "RetinaNet"
    assert len(model.backbone.bottom_up.res2) == 2, "R-18 has two blocks per stage"
    losses = _train_step_and_infer(model, num_classes=3, max_detections=cfg.TEST.DETECTIONS_PER_IMAGE)
    assert set(losses) == {"loss_cls", "loss_box_reg"}


def test_fcos_r18_from_upstream_config_trains_and_infers(patched_tree) -> None:
    import adet.modeling  # noqa: F401  (registers FCOS and OneStageDetector)
    from adet.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / "external/AdelaiDet/configs/FCOS-Detection/R_50_1x.yaml"))
    _r18(cfg)
    cfg.MODEL.FCOS.NUM_CLASSES = 3
    model = build_model(cfg)
    assert type(model).__name__ == "OneStageDetector"
    assert type(model.proposal_generator).__name__ == "FCOS"
    # At 128 px every box falls in P3's size range, so the box-scale of P4..P7 gets no regression target.
    idle = frozenset(f"proposal_generator.fcos_head.scales.{level}.scale" for level in range(1, 5))
    losses = _train_step_and_infer(model, 3, max_detections=cfg.MODEL.FCOS.POST_NMS_TOPK_TEST, idle=idle)
    assert {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"} <= set(losses)


def test_patched_modules_behave(patched_tree) -> None:
    """Each patch's user-visible effect, on the imported tree."""
    import adet.evaluation.text_eval_script as text_eval
    import adet.layers
    from detectron2 import model_zoo

    path = Path(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    assert path.is_file() and path.read_text().startswith("_BASE_")
    with pytest.raises(RuntimeError, match="not available in Model Zoo"):
        model_zoo.get_config_file("COCO-Detection/no_such_config.yaml")
    assert text_eval.Levenshtein.distance("kitten", "sitting") == 3
    # adet._C compiled on torch 2.x: its deformable ROI align runs on the CPU build.
    assert hasattr(adet.layers, "DefROIAlign")


@pytest.mark.parametrize(
    "module", ["model_quantization.detectron2.datasets", "model_quantization.detectron2"]
)
def test_integration_modules_import_before_detectron2(patched_tree, module: str) -> None:
    """detectron2's (patched) builtin datasets import our datasets module: either may come first."""
    import subprocess
    import sys

    code = f"import {module}\nfrom detectron2.data import DatasetCatalog\nassert 'shapes_val' in DatasetCatalog.list()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
