"""Shared helpers for the detectron2 integration tests: configs sized for a CPU test, fixed batches."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs" / "detectron2"
ADET_CONFIG_DIR = ROOT / "configs" / "AdelaiDet"
QUANTIZABLE = ("Conv2d", "ConvTranspose2d", "Linear", "Add", "WeightedAdd", "DynamicConv2d")


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


def build_and_check(path: Path):
    """Build the model of config `path`; return (cfg, model, quantized rows), rows None when disabled."""
    from detectron2.modeling import build_model

    cfg = load_cfg(path)
    model = build_model(cfg)
    if not cfg.MODEL.QUANTIZATION.ENABLED:
        assert not hasattr(model, "quantization_report"), f"{path.name}: quantized with ENABLED False"
        return cfg, model, None
    return cfg, model, assert_nothing_silently_float(model, path.name)


def quantizer_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer that belongs to a quantizer, by qualified name."""
    from model_quantization.quantizers import Quantizer

    state = {}
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            for key, value in module.state_dict().items():
                state[f"{name}.{key}"] = value.detach().clone()
    return state


def pin_tree(tmp_path: Path, name: str, package: str) -> Path:
    """The Python package of external/<name> at its pin, unpatched, plus the build's compiled extension.

    The extension comes from the patched build: our patches change only how its C++ is spelled for torch
    2.x, not what it computes. Put the returned directory first on sys.path to import the unpatched code.
    """
    repo = ROOT / "external" / name
    pin = subprocess.run(
        ["git", "ls-files", "--stage", f"external/{name}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    archive = subprocess.run(
        ["git", "archive", pin, package], cwd=repo, capture_output=True, check=True
    ).stdout
    target = tmp_path / f"pin-{name}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    for so in (repo / package).glob("_C*.so"):
        shutil.copy2(so, target / package / so.name)
    return target


#: Run in a subprocess with the *unpatched* trees first on sys.path (argv: data file, output file, trees):
#: build the float model of the given config, load the given weights, save the predictions.
UNPATCHED_FORWARD = r"""
import sys, torch
sys.path[:0] = sys.argv[3:]
import detectron2
assert detectron2.__file__.startswith(sys.argv[3]), detectron2.__file__
data = torch.load(sys.argv[1], weights_only=False)
# AdelaiDet adds its keys to detectron2's global defaults on import; once the test process has imported it,
# every dumped config carries them, so the unpatched side imports it too.
import adet
assert adet.__file__.startswith(sys.argv[4]), adet.__file__
from adet.config import get_cfg
from detectron2.modeling import build_model
cfg = get_cfg()
assert "QUANTIZATION" not in cfg.MODEL, "this must be the unpatched tree"
cfg.merge_from_other_cfg(cfg.load_cfg(data["cfg"]))
model = build_model(cfg).eval()
model.load_state_dict(data["state"])
with torch.no_grad():
    out = model(data["inputs"])
torch.save([{k: v for k, v in o["instances"].get_fields().items()} for o in out], sys.argv[2])
"""


def assert_same_as_unpatched(tmp_path: Path, config: Path) -> None:
    """With quantization off, the patched trees predict exactly what the unpatched pins predict.

    Builds the model of `config` (random weights, seed 0), runs it on two shapes images, then builds the
    same architecture with the pins' code in a subprocess, loads the same weights and compares.
    """
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    # FPN_ACTIVATION is ours (the pins have no such option): compare the architecture both trees can build.
    cfg = load_cfg(config, "MODEL.QUANTIZATION.ENABLED", False, "MODEL.QUANTIZATION.FPN_ACTIVATION", "")
    model = build_model(cfg).eval()
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in shapes_batch(2)]
    with torch.no_grad():
        ours = [o["instances"].get_fields() for o in model(inputs)]
    plain_cfg = cfg.clone()
    plain_cfg.MODEL.pop("QUANTIZATION")
    data = tmp_path / "data.pt"
    torch.save({"cfg": plain_cfg.dump(), "state": model.state_dict(), "inputs": inputs}, data)
    trees = [pin_tree(tmp_path, "detectron2", "detectron2"), pin_tree(tmp_path, "AdelaiDet", "adet")]
    proc = subprocess.run(
        [sys.executable, "-c", UNPATCHED_FORWARD, str(data), str(tmp_path / "out.pt"), *map(str, trees)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt", weights_only=False)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert set(a) == set(b)
        for key in a:
            tensor_a = a[key].tensor if hasattr(a[key], "tensor") else a[key]
            tensor_b = b[key].tensor if hasattr(b[key], "tensor") else b[key]
            assert torch.equal(tensor_a, tensor_b), f"{key} differs from the unpatched pin"


#: Run in a new process ("kill and resume"): build the model from the config, load the checkpoint with
#: the optimizer, report the quantizer state and the loss of the next batch.
RESUME = r"""
import sys, torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage
from tests.integration.d2_helpers import load_cfg, quantizer_state, shapes_batch
cfg = load_cfg(sys.argv[1])
model = build_model(cfg)
optimizer = build_optimizer(cfg, model)
DetectionCheckpointer(model, sys.argv[2], optimizer=optimizer).resume_or_load(sys.argv[3], resume=True)
state = quantizer_state(model)
model.train()
torch.manual_seed(123)
with EventStorage(2):
    loss = sum(model(shapes_batch(2, seed=3)).values())
torch.save({"state": state, "loss": loss.item()}, sys.argv[4])
"""


def assert_resume_is_exact(tmp_path: Path, config: Path) -> None:
    """Train 2 steps, checkpoint, resume in a new process: same quantizer state, same next loss (bitwise)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    cfg = load_cfg(config)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    model.train()
    with EventStorage(0) as storage:
        for step in range(2):
            storage.iter = step
            loss = sum(model(shapes_batch(2, seed=step)).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    DetectionCheckpointer(model, str(tmp_path), optimizer=optimizer).save("model_0000001")
    expected_state = quantizer_state(model)
    torch.manual_seed(123)
    with EventStorage(2):
        expected_loss = sum(model(shapes_batch(2, seed=3)).values()).item()

    proc = subprocess.run(
        [sys.executable, "-c", RESUME, str(config), str(tmp_path), str(tmp_path / "model_0000001.pth"),
         str(tmp_path / "resumed.pt")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert set(resumed["state"]) == set(expected_state) and expected_state
    for key, value in expected_state.items():
        assert torch.equal(resumed["state"][key], value), key
    assert resumed["loss"] == expected_loss


def double_init(
    tmp_path: Path, float_config: Path, quantized_config: Path, backbone_prefix: str, with_masks=False
):
    """Build the double-init case: a float detector checkpoint (from `float_config`), a "low-bit backbone"
    checkpoint (the part at `backbone_prefix` of another quantized model, steps initialised from data,
    keys as a backbone has them), and the `quantized_config` model loaded with both.

    Returns ``(float_state, backbone_state, model)``.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    torch.manual_seed(1)
    float_model = build_model(load_cfg(float_config))
    DetectionCheckpointer(float_model, str(tmp_path)).save("float_detector")
    torch.manual_seed(2)
    source = build_model(load_cfg(quantized_config))
    source.train()
    with EventStorage(0):
        source(shapes_batch(2, with_masks=with_masks))
    backbone_state = source.get_submodule(backbone_prefix.rstrip(".")).state_dict()
    torch.save(backbone_state, tmp_path / "low_bit_backbone.pth")

    cfg = load_cfg(
        quantized_config,
        "MODEL.WEIGHTS", str(tmp_path / "float_detector.pth"),
        "MODEL.QUANTIZATION.BACKBONE_WEIGHTS", str(tmp_path / "low_bit_backbone.pth"),
    )  # fmt: skip
    model = build_model(cfg)
    DetectionCheckpointer(model, str(tmp_path)).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    return float_model.state_dict(), backbone_state, model
