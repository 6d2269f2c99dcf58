"""Shared helpers for the detectron2 integration tests: configs sized for a CPU test, fixed batches."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs" / "detectron2"
ADET_CONFIG_DIR = ROOT / "configs" / "AdelaiDet"
QUANTIZABLE = ("Conv2d", "ConvTranspose2d", "Linear", "Add", "DynamicConv2d")


def config_files(directory: Path = CONFIG_DIR) -> list[Path]:
    """Every runnable config (the Base-* files are only inherited)."""
    return sorted(p for p in directory.rglob("*.yaml") if not p.name.startswith("Base-"))


def load_cfg(path: Path, *opts):
    """The config at `path`, without weights (nothing to download), sized for a CPU test, plus `opts`.

    Configs under configs/AdelaiDet use AdelaiDet's get_cfg (detectron2's defaults plus its own).
    """
    if ADET_CONFIG_DIR in Path(path).resolve().parents:
        import adet.modeling  # noqa: F401  (registers AdelaiDet's meta-architectures)
        from adet.config import get_cfg
    else:
        from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(
        [
            "MODEL.WEIGHTS", "",
            "MODEL.DEVICE", "cpu",
            "DATASETS.TRAIN", ("shapes_tiny_train",),
            "DATASETS.TEST", ("shapes_tiny_val",),
            "SOLVER.IMS_PER_BATCH", 2,
            "DATALOADER.NUM_WORKERS", 0,
            *opts,
        ]
    )  # fmt: skip
    return cfg


def shapes_batch(size: int = 2, seed: int = 0, with_masks: bool = False) -> list[dict]:
    """A fixed training batch from the tiny shapes split (deterministic: same seed, same tensors)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T
    from detectron2.data.dataset_mapper import DatasetMapper

    dicts = DatasetCatalog.get("shapes_tiny_train")
    mapper = DatasetMapper(
        is_train=True,
        augmentations=[T.ResizeShortestEdge(128, 128)],
        image_format="BGR",
        use_instance_mask=with_masks,
        instance_mask_format="polygon",
    )
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dicts), generator=generator)[:size].tolist()
    return [mapper(dicts[i]) for i in picks]


def assert_nothing_silently_float(model: torch.nn.Module, label: str) -> dict[str, dict]:
    """Every quantizable module is quantized or skipped by an explicit rule; returns the quantized rows."""
    report = model.quantization_report
    quantized = {row.name: dataclasses.asdict(row) for row in report.quantized}
    float_reasons = {row.name: row.reason for row in report.left_float}
    for name, module in model.named_modules():
        kinds = [c.__name__ for c in type(module).__mro__]
        if not any(k in QUANTIZABLE for k in kinds) or name in quantized:
            continue
        reason = float_reasons.get(name, "")
        assert reason.startswith("skipped by rule"), f"{label}: {name} ({kinds[0]}) left float: {reason!r}"
    return quantized


def quantizer_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer that belongs to a quantizer, by qualified name."""
    from model_quantization.quantizers import Quantizer

    state = {}
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            for key, value in module.state_dict().items():
                state[f"{name}.{key}"] = value.detach().clone()
    return state
