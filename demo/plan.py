"""What the demo runs: the models, their float and quantized variants, and a schedule per mode.

A *variant* is one row of the result table: a config file plus the variant it starts from (quantized
variants fine-tune the float model's final weights, with data-driven LSQ step initialisation). A *mode*
scales the schedule: ``quick`` (a smoke run for tests), ``default`` (the README's numbers, 2 CPU cores)
and ``full`` (the COCO recipes in ``configs/*/coco``, for a GPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from model_quantization.footprint import FLOAT_BITS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

__all__ = ["MODELS", "MODES", "Mode", "ModelPlan", "Variant", "variants"]


@dataclass(frozen=True)
class Variant:
    """One row of the table.

    Attributes:
        key: unique name, also the run's directory name (``retinanet/lsq_w4a4``).
        model: display name of the detector (``RetinaNet R-18``).
        config: the config file (relative to the repository root).
        weight_bits, activation_bits: the bit widths of the bulk of the layers (32 = float).
        note: what differs from plain W/A bits (e.g. 8-bit first/last layers), shown in the table.
        parent: key of the variant whose final weights this one starts from (None: from scratch).
        adelaidet: the config uses AdelaiDet's defaults (``adet.config.get_cfg``).
        opts: extra config overrides (``merge_from_list`` pairs).
    """

    key: str
    model: str
    config: Path
    weight_bits: int
    activation_bits: int
    note: str = ""
    parent: str | None = None
    adelaidet: bool = False
    opts: tuple = ()

    @property
    def from_scratch(self) -> bool:
        """Trained from scratch with the float schedule (otherwise fine-tuned with the QAT schedule)."""
        return self.parent is None

    @property
    def quantized(self) -> bool:
        return self.weight_bits != FLOAT_BITS

    @property
    def bits_label(self) -> str:
        label = f"{self.weight_bits}/{self.activation_bits}" if self.quantized else "float"
        return f"{label} ({self.note})" if self.note else label


@dataclass(frozen=True)
class ModelPlan:
    """A detector and the configs of its variants, per config family (``shapes`` or ``coco``)."""

    name: str
    model: str
    adelaidet: bool
    #: family -> (float config, {bits: (quantized config, note)})
    configs: dict[str, tuple[str, dict[int, tuple[str, str]]]]


#: What the quantized rows keep at 8 bits besides the bulk of the layers (the configs' "mixed" recipe).
MIXED = "8-bit stem, predictors, sums"


def _mixed(prefix: str) -> dict[int, tuple[str, str]]:
    return {bits: (prefix.format(bits=bits), MIXED) for bits in (4, 3, 2)}


MODELS: dict[str, ModelPlan] = {
    "retinanet": ModelPlan(
        name="retinanet",
        model="RetinaNet R-18",
        adelaidet=False,
        configs={
            "shapes": (
                "detectron2/shapes/retinanet_R_18_FPN_fullbn_float.yaml",
                _mixed("detectron2/shapes/retinanet_R_18_FPN_fullbn_lsq_w{bits}a{bits}_mixed.yaml"),
            ),
            "coco": (
                "detectron2/coco/retinanet_R_18_FPN_1x_fullbn_float.yaml",
                _mixed("detectron2/coco/retinanet_R_18_FPN_1x_fullbn_lsq_w{bits}a{bits}_mixed.yaml"),
            ),
        },
    ),
    "fcos": ModelPlan(
        name="fcos",
        model="FCOS R-18",
        adelaidet=True,
        configs={
            "shapes": (
                "AdelaiDet/shapes/fcos_R_18_FPN_fullbn_float.yaml",
                _mixed("AdelaiDet/shapes/fcos_R_18_FPN_fullbn_lsq_w{bits}a{bits}_mixed.yaml"),
            ),
            "coco": (
                "AdelaiDet/coco/fcos_R_18_1x_fullbn_float.yaml",
                _mixed("AdelaiDet/coco/fcos_R_18_1x_fullbn_lsq_w{bits}a{bits}_mixed.yaml"),
            ),
        },
    ),
}


@dataclass(frozen=True)
class Mode:
    """How long each phase trains, and on what.

    Attributes:
        name: ``quick``, ``default`` or ``full``.
        family: config family (``shapes`` or ``coco``).
        float_iters, quant_iters: iterations of the float run and of each quantized fine-tune; None keeps
            the config's own schedule (``full``).
        test_dataset: evaluation split (None: the config's ``DATASETS.TEST``).
        device: ``cpu`` for the CPU modes; None keeps the config's ``MODEL.DEVICE``.
    """

    name: str
    family: str
    float_iters: int | None
    quant_iters: int | None
    test_dataset: str | None
    device: str | None

    def schedule_opts(self, variant: Variant) -> list:
        """Config overrides (``merge_from_list`` pairs) that scale the schedule of `variant`."""
        scratch = variant.from_scratch
        iters = self.float_iters if scratch else self.quant_iters
        opts: list = list(variant.opts)
        if iters is not None:
            # The config's LR-decay points keep their relative position in the shorter schedule.
            steps = (round(iters * 0.75), round(iters * 0.9)) if scratch else (round(iters * 0.75),)
            warmup = min(50 if scratch else 20, max(iters // 10, 1))
            opts += ["SOLVER.MAX_ITER", iters, "SOLVER.STEPS", steps, "SOLVER.WARMUP_ITERS", warmup]
        if self.test_dataset is not None:
            opts += ["DATASETS.TEST", (self.test_dataset,)]
        if self.device is not None:
            opts += ["MODEL.DEVICE", self.device]
        return opts


MODES: dict[str, Mode] = {
    "quick": Mode("quick", "shapes", float_iters=40, quant_iters=10, test_dataset="shapes_quick_val",
                  device="cpu"),
    "default": Mode("default", "shapes", float_iters=800, quant_iters=200, test_dataset=None,
                    device="cpu"),
    "full": Mode("full", "coco", float_iters=None, quant_iters=None, test_dataset=None, device=None),
}  # fmt: skip


def variants(
    mode: Mode, models: list[str] | tuple[str, ...] = tuple(MODELS), bits=(4, 3, 2)
) -> list[Variant]:
    """The rows the demo runs, in run order, per model: the float run from scratch; the same model
    fine-tuned with exactly the QAT schedule and quantization off (the like-for-like reference: the
    quantized rows train that much longer than the float run); then the quantized fine-tunes."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown demo model(s) {unknown}; choose from {sorted(MODELS)}")
    out: list[Variant] = []
    for name in models:
        plan = MODELS[name]
        float_config, quantized = plan.configs[mode.family]
        base = Variant(
            key=f"{name}/float", model=plan.model, config=Path("configs") / float_config,
            weight_bits=32, activation_bits=32, adelaidet=plan.adelaidet,
        )  # fmt: skip
        out.append(base)
        reference_config, _ = quantized[max(quantized)]
        out.append(
            dataclasses.replace(
                base,
                key=f"{name}/float_finetuned",
                config=Path("configs") / reference_config,
                note="fine-tuned like the QAT rows",
                parent=base.key,
                opts=("MODEL.QUANTIZATION.ENABLED", False),
            )  # fmt: skip
        )
        for b in bits:
            if b not in quantized:
                raise ValueError(
                    f"{name}: no {b}-bit config in the {mode.family!r} family; have {sorted(quantized)}"
                )
            config, note = quantized[b]
            out.append(
                dataclasses.replace(
                    base,
                    key=f"{name}/lsq_w{b}a{b}",
                    config=Path("configs") / config,
                    weight_bits=b,
                    activation_bits=b,
                    note=note,
                    parent=base.key,
                )  # fmt: skip
            )
    return out
