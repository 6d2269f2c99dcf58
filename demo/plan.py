"""What the demo runs: the models, their float, QAT and PTQ variants, and how each mode runs them.

A *variant* is one row of the result table: a config file, how the row is produced (trained from scratch,
fine-tuned from another row's weights, or calibrated from them without training) and the row it starts
from. Schedules live in the configs only: the default mode trains exactly what ``train_net.py`` would
with the same config; ``quick`` scales them down for a smoke run; ``full`` runs the COCO configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from model_quantization.detectron2.config import WITHOUT_DEPLOY_OPTIONS
from model_quantization.footprint import FLOAT_BITS

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["KINDS", "MODELS", "MODES", "PROGRESSIVE", "Mode", "ModelPlan", "Variant", "variants"]

#: How a row is produced: trained (from scratch without a parent, else fine-tuned from the parent's
#: weights) or calibrated from the parent's weights without training (post-training quantization).
KINDS = ("train", "calibrate")


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
        kind: ``train`` or ``calibrate`` (see :data:`KINDS`).
        adelaidet: the config uses AdelaiDet's defaults (``adet.config.get_cfg``).
        opts: extra config overrides (``merge_from_list`` pairs).
        teacher: key of the variant whose final weights teach this one under distillation (None: the
            weights it starts from, the config's default). A run that starts from a higher-bit QAT row
            (progressive bit widths) is still taught by the float model.
        reference: key of the float row this row is compared with (ΔAP); None: the table's default
            (the like-for-like float row of its model).
    """

    key: str
    model: str
    config: Path
    weight_bits: int
    activation_bits: int
    note: str = ""
    parent: str | None = None
    kind: str = "train"
    adelaidet: bool = False
    opts: tuple = ()
    teacher: str | None = None
    reference: str | None = None

    @property
    def from_scratch(self) -> bool:
        """Trained from scratch (no parent)."""
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
    """A detector and the configs of its variants, per config family (``shapes`` or ``coco``).

    Attributes:
        configs: family -> (float config, {bits: QAT config}, {(w, a) bits: PTQ config}).
    """

    name: str
    model: str
    adelaidet: bool
    configs: dict[str, tuple[str, dict[int, str], dict[tuple[int, int], str]]]


#: Progressive bit widths: bits -> the bits of the QAT row whose weights a row of these bits starts from
#: (instead of the float model). Its quantizers initialise from data again (``REINIT_QUANTIZERS``); its
#: like-for-like float row is fine-tuned as many times. See ``README`` (recipe study) for why 2 from 4.
PROGRESSIVE: dict[int, int] = {2: 4}

#: What the quantized rows keep at 8 bits besides the bulk of the layers (the configs' "mixed" recipe).
MIXED = "8-bit stem, predictors, sums"
#: The PTQ rows: no training, per-channel weights.
PTQ = "PTQ, no training"


def _family(float_config: str, qat: str, ptq: str) -> tuple[str, dict[int, str], dict[tuple[int, int], str]]:
    return (
        float_config,
        {bits: qat.format(bits=bits) for bits in (4, 3, 2)},
        {bits: ptq.format(w=bits[0], a=bits[1]) for bits in ((8, 8), (4, 8))},
    )


MODELS: dict[str, ModelPlan] = {
    "retinanet": ModelPlan(
        name="retinanet",
        model="RetinaNet R-18",
        adelaidet=False,
        configs={
            "shapes": _family(
                "detectron2/shapes/retinanet_R_18_FPN_fullbn_float.yaml",
                "detectron2/shapes/retinanet_R_18_FPN_fullbn_lsq_w{bits}a{bits}_mixed.yaml",
                "detectron2/shapes/retinanet_R_18_FPN_fullbn_ptq_w{w}a{a}.yaml",
            ),
            "coco": _family(
                "detectron2/coco/retinanet_R_18_FPN_1x_fullbn_float.yaml",
                "detectron2/coco/retinanet_R_18_FPN_1x_fullbn_lsq_w{bits}a{bits}_mixed.yaml",
                "detectron2/coco/retinanet_R_18_FPN_1x_fullbn_ptq_w{w}a{a}.yaml",
            ),
        },
    ),
    "fcos": ModelPlan(
        name="fcos",
        model="FCOS R-18",
        adelaidet=True,
        configs={
            "shapes": _family(
                "AdelaiDet/shapes/fcos_R_18_FPN_fullbn_float.yaml",
                "AdelaiDet/shapes/fcos_R_18_FPN_fullbn_lsq_w{bits}a{bits}_mixed.yaml",
                "AdelaiDet/shapes/fcos_R_18_FPN_fullbn_ptq_w{w}a{a}.yaml",
            ),
            "coco": _family(
                "AdelaiDet/coco/fcos_R_18_1x_fullbn_float.yaml",
                "AdelaiDet/coco/fcos_R_18_1x_fullbn_lsq_w{bits}a{bits}_mixed.yaml",
                "AdelaiDet/coco/fcos_R_18_1x_fullbn_ptq_w{w}a{a}.yaml",
            ),
        },
    ),
}


@dataclass(frozen=True)
class Mode:
    """How each variant runs.

    Attributes:
        name: ``quick``, ``default`` or ``full``.
        family: config family (``shapes`` or ``coco``).
        float_iters, quant_iters: iterations of the float run and of each fine-tune; None keeps the
            config's own schedule (``default`` and ``full``: the schedule lives in the configs).
        test_dataset: evaluation split (None: the config's ``DATASETS.TEST``).
        device: ``cpu`` for the CPU modes; None keeps the config's ``MODEL.DEVICE``.
        calibration_images: images a PTQ row calibrates on (None: the config's recipe, 256).
        train_dataset: training split (None: the config's ``DATASETS.TRAIN``).
        seed: detectron2's ``SEED`` (data order, initialisation, augmentation): a re-run reproduces the
            table.
        onnx_variants: the variants (key suffixes: ``float``, ``lsq_w4a4``, ...) exported to ONNX and
            evaluated in ONNX Runtime; None: every row. The smoke run exports one row of each kind (float,
            QAT, PTQ) per model: each export traces the whole network (~25 s here).
    """

    name: str
    family: str
    float_iters: int | None
    quant_iters: int | None
    test_dataset: str | None
    device: str | None
    calibration_images: int | None = None
    train_dataset: str | None = None
    seed: int = 0
    onnx_variants: tuple[str, ...] | None = None

    def exports(self, variant: Variant) -> bool:
        """Whether `variant`'s row gets the ONNX columns in this mode."""
        return self.onnx_variants is None or variant.key.split("/")[-1] in self.onnx_variants

    def opts(self, variant: Variant) -> list:
        """Config overrides (``merge_from_list`` pairs) of `variant` in this mode."""
        iters = self.float_iters if variant.from_scratch else self.quant_iters
        opts: list = list(variant.opts) + ["SEED", self.seed]
        if iters is not None and variant.kind == "train":
            # The config's LR-decay points keep their relative position in the shorter schedule.
            steps = (
                (round(iters * 0.75), round(iters * 0.9)) if variant.from_scratch else (round(iters * 0.75),)
            )
            warmup = min(50 if variant.from_scratch else 20, max(iters // 10, 1))
            opts += ["SOLVER.MAX_ITER", iters, "SOLVER.STEPS", steps, "SOLVER.WARMUP_ITERS", warmup]
        if self.train_dataset is not None:
            opts += ["DATASETS.TRAIN", (self.train_dataset,)]
        if self.test_dataset is not None:
            opts += ["DATASETS.TEST", (self.test_dataset,)]
        if self.device is not None:
            opts += ["MODEL.DEVICE", self.device]
        return opts


MODES: dict[str, Mode] = {
    "quick": Mode("quick", "shapes", float_iters=40, quant_iters=10, test_dataset="shapes_quick_val",
                  device="cpu", calibration_images=16, onnx_variants=("float", "lsq_w4a4", "ptq_w8a8")),
    "default": Mode("default", "shapes", float_iters=None, quant_iters=None, test_dataset=None, device="cpu"),
    "full": Mode("full", "coco", float_iters=None, quant_iters=None, test_dataset=None, device=None),
}  # fmt: skip


def _finetuned_key(name: str, times: int) -> str:
    """The like-for-like float row fine-tuned `times` times by the QAT schedule."""
    return f"{name}/float_finetuned" + ("" if times == 1 else f"_{times}x")


def variants(
    mode: Mode,
    models: list[str] | tuple[str, ...] = tuple(MODELS),
    bits=(4, 3, 2),
    ptq=((8, 8), (4, 8)),
    progressive: dict[int, int] | None = None,
) -> list[Variant]:
    """The rows the demo runs, in run order, per model: the float run from scratch; the same model
    fine-tuned with exactly the QAT schedule and quantization off (the like-for-like reference: the
    quantized rows train that much longer than the float run; only with QAT rows); the QAT fine-tunes
    at each of `bits`; the PTQ rows.

    `progressive` (default :data:`PROGRESSIVE`) chains QAT rows: a row of bits ``b`` starts from the row of
    bits ``progressive[b]`` when that one is in `bits` too (else from the float model), keeps the float
    model as its distillation teacher, and is compared with the float model fine-tuned by the QAT schedule
    once per link of its chain (a row ``float_finetuned_2x`` and so on: like for like).
    """
    progressive = PROGRESSIVE if progressive is None else progressive
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown demo model(s) {unknown}; choose from {sorted(MODELS)}")

    def chain(b: int) -> list[int]:
        """`b` and the bit widths its row starts from, lowest first (``[2, 4]``: 2 from 4 from float)."""
        links = [b]
        while progressive.get(links[-1]) in bits and progressive[links[-1]] not in links:
            links.append(progressive[links[-1]])
        return links

    out: list[Variant] = []
    for name in models:
        plan = MODELS[name]
        float_config, quantized, calibrated = plan.configs[mode.family]
        base = Variant(
            key=f"{name}/float", model=plan.model, config=Path("configs") / float_config,
            weight_bits=FLOAT_BITS, activation_bits=FLOAT_BITS, adelaidet=plan.adelaidet,
        )  # fmt: skip
        out.append(base)
        missing = [b for b in bits if b not in quantized]
        if missing:
            raise ValueError(
                f"{name}: no {missing[0]}-bit config in the {mode.family!r} family; have {sorted(quantized)}"
            )
        # without QAT rows there is nothing to compare like for like
        for times in range(1, max((len(chain(b)) for b in bits), default=0) + 1):
            out.append(
                dataclasses.replace(
                    base,
                    key=_finetuned_key(name, times),
                    config=Path("configs") / quantized[max(quantized)],
                    note="fine-tuned like the QAT rows"
                    if times == 1
                    else f"fine-tuned {times}x like the QAT rows",
                    parent=base.key if times == 1 else _finetuned_key(name, times - 1),
                    # The QAT schedule with quantization (and what only applies to it) off.
                    opts=(
                        "MODEL.QUANTIZATION.ENABLED",
                        False,
                        "MODEL.QUANTIZATION.DISTILLATION.ENABLED",
                        False,
                        "MODEL.QUANTIZATION.REINIT_QUANTIZERS",
                        False,
                        *WITHOUT_DEPLOY_OPTIONS,
                    ),
                )  # fmt: skip
            )
        # a chain's rows run after the rows they start from
        for b in sorted(bits, key=lambda b: (len(chain(b)), bits.index(b))):
            links = chain(b)
            start = links[1] if len(links) > 1 else None
            out.append(
                dataclasses.replace(
                    base,
                    key=f"{name}/lsq_w{b}a{b}",
                    config=Path("configs") / quantized[b],
                    weight_bits=b,
                    activation_bits=b,
                    note=MIXED if start is None else f"{MIXED}; from {start}/{start}",
                    parent=base.key if start is None else f"{name}/lsq_w{start}a{start}",
                    teacher=None if start is None else base.key,
                    reference=_finetuned_key(name, len(links)),
                    opts=() if start is None else ("MODEL.QUANTIZATION.REINIT_QUANTIZERS", True),
                )  # fmt: skip
            )
        for w, a in ptq:
            out.append(
                dataclasses.replace(
                    base,
                    key=f"{name}/ptq_w{w}a{a}",
                    config=Path("configs") / calibrated[(w, a)],
                    weight_bits=w,
                    activation_bits=a,
                    note=PTQ,
                    parent=base.key,
                    kind="calibrate",
                )  # fmt: skip
            )
    return out
