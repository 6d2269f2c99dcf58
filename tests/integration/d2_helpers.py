"""Shared helpers for the detectron2 integration tests: configs sized for a CPU test, fixed batches."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs" / "detectron2"


def config_files() -> list[Path]:
    """Every runnable config (the Base-* files are only inherited)."""
    return sorted(p for p in CONFIG_DIR.rglob("*.yaml") if not p.name.startswith("Base-"))


def load_cfg(path: Path, *opts):
    """The config at `path`, without weights (nothing to download), sized for a CPU test, plus `opts`."""
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


def quantizer_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer that belongs to a quantizer, by qualified name."""
    from model_quantization.quantizers import Quantizer

    state = {}
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            for key, value in module.state_dict().items():
                state[f"{name}.{key}"] = value.detach().clone()
    return state
