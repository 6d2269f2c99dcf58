"""``MODEL.QUANTIZATION`` is parsed once and validated as a whole: keys that quantization being off would
ignore, wrongly typed options and out-of-range values are errors naming the key, never silent no-ops."""

from __future__ import annotations

import pytest

from .d2_helpers import CONFIG_DIR, load_cfg

pytestmark = pytest.mark.integration

SHAPES = CONFIG_DIR / "shapes"
FLOAT = SHAPES / "retinanet_R_18_FPN_fullbn_float.yaml"
QUANTIZED = SHAPES / "retinanet_R_18_FPN_fullbn_lsq_w4a4.yaml"


def _build(path, *opts):
    from detectron2.modeling import build_model

    return build_model(load_cfg(path, *opts))


@pytest.mark.parametrize(
    "path, opts, message",
    [
        # Quantization off: settings that would silently change the model or be ignored.
        (FLOAT, ["MODEL.QUANTIZATION.FPN_ACTIVATION", "swish"], r"FPN_ACTIVATION: unknown activation 'swish'"),
        (FLOAT, ["MODEL.QUANTIZATION.SCOPE", "heads"], r"SCOPE: unknown scope 'heads'"),
        (FLOAT, ["MODEL.QUANTIZATION.BACKBONE_WEIGHTS", "x.pth"], r"BACKBONE_WEIGHTS='x.pth' is set but .*ENABLED is False"),
        (FLOAT, ["MODEL.QUANTIZATION.WEIGHT.BITS", 9], r"MODEL.QUANTIZATION.WEIGHT.BITS: must be an integer"),
        (FLOAT, ["MODEL.QUANTIZATION.INTEGER_BIAS", True], r"INTEGER_BIAS is set but MODEL.QUANTIZATION.ENABLED is False"),
        (FLOAT, ["MODEL.QUANTIZATION.OUTPUT_QUANTIZERS", ["head.cls_score"]], r"OUTPUT_QUANTIZERS is set but MODEL.QUANTIZATION.ENABLED is False"),
        (QUANTIZED, ["MODEL.QUANTIZATION.OUTPUT_QUANTIZERS", ["head.cls_scores"]], r"OUTPUT_QUANTIZERS: 'head.cls_scores' matches no quantized conv"),
        (QUANTIZED, ["MODEL.QUANTIZATION.OUTPUT_QUANTIZERS", ["head.cls_score", 3]], r"OUTPUT_QUANTIZERS: expected a list of non-empty glob strings"),
        # Typed options: booleans are booleans, numbers numbers.
        (QUANTIZED, ["MODEL.QUANTIZATION.WEIGHT.OPTIONS", {"GRAD_SCALE": "no"}], r"WEIGHT.OPTIONS.GRAD_SCALE: must be true or false, got 'no'"),
        (QUANTIZED, ["MODEL.QUANTIZATION.WEIGHT.OPTIONS", {"INIT_VALUE": "abc"}], r"WEIGHT.OPTIONS.INIT_VALUE: must be a number or null, got 'abc'"),
        (QUANTIZED, ["MODEL.QUANTIZATION.WEIGHT", {"METHOD": "lqnet", "BITS": 2, "OPTIONS": {"TERNARY": "no"}}], r"WEIGHT.OPTIONS.TERNARY: must be true or false"),
        (QUANTIZED, ["MODEL.QUANTIZATION.ACTIVATION", {"METHOD": "dorefa", "OPTIONS": {"CLIP": True}}], r"ACTIVATION.OPTIONS.CLIP: must be a number, got True"),
        (QUANTIZED, ["MODEL.QUANTIZATION.RULES", [{"PATTERN": "head", "WEIGHT": {"BITS": False}}]], r"RULES\[0\] \('head'\).WEIGHT.BITS: must be an integer in \[1, 8\] or 'off', got False"),
        # Optimizer settings of quantizer parameters: negative values would make steps climb the loss.
        (QUANTIZED, ["MODEL.QUANTIZATION.QUANTIZER_LR_FACTOR", -1.0], r"QUANTIZER_LR_FACTOR: must be a number >= 0, got -1.0"),
        (QUANTIZED, ["MODEL.QUANTIZATION.QUANTIZER_WEIGHT_DECAY", -1.0], r"QUANTIZER_WEIGHT_DECAY: must be a number >= 0"),
        (QUANTIZED, ["MODEL.QUANTIZATION.BACKBONE_WEIGHTS", "/no/such/backbone.pth"], r"BACKBONE_WEIGHTS: no such file: '/no/such/backbone.pth'"),
        # A rule whose only override is WEIGHT, matching only sums (no weights): it would change nothing.
        (QUANTIZED, ["MODEL.QUANTIZATION.RULES", [{"PATTERN": "*.residual_add", "WEIGHT": {"BITS": 8}}]], r"RULES\[0\] \('\*.residual_add'\): its only override is 'weight', but it matches only modules without weights"),
    ],
)  # fmt: skip
def test_bad_settings_fail_at_build_naming_the_key(patched_tree, path, opts, message):
    with pytest.raises(ValueError, match=message):
        _build(path, *opts)


def test_the_parsed_config_is_what_modeling_and_the_optimizer_read(patched_tree):
    from detectron2.solver import build_optimizer

    cfg = load_cfg(QUANTIZED, "MODEL.QUANTIZATION.QUANTIZER_LR_FACTOR", 0.5)
    from detectron2.modeling import build_model

    model = build_model(cfg)
    config = model.quantization_config
    assert config.enabled and config.lr_factor == 0.5 and config.spec.weight.bits == 4
    groups = build_optimizer(cfg, model).param_groups
    steps = {id(p) for n, p in model.named_parameters() if n.endswith(".step")}
    lrs = {g["lr"] for g in groups if {id(p) for p in g["params"]} & steps}
    assert lrs == {cfg.SOLVER.BASE_LR * 0.5}


def test_the_conversion_report_lists_the_rules_in_effect(patched_tree):
    report = str(_build(QUANTIZED).quantization_report)
    assert (
        "Rules in effect (a config's RULES replace its base's): [0] backbone.bottom_up.stem.conv1" in report
    )


def test_an_omegaconf_config_builds_as_the_yacs_one_does(patched_tree):
    """detectron2 builds models from ``OmegaConf.create(cfg.dump())`` too (its own test_yacs_config does):
    the rules arrive as a ListConfig of DictConfigs, and must be read as the YACS lists and dicts are."""
    from detectron2.modeling import build_model
    from omegaconf import OmegaConf

    from model_quantization.detectron2.config import parse_quantization_config

    for path in (FLOAT, QUANTIZED):
        yacs = load_cfg(path)
        omega = OmegaConf.create(yacs.dump())
        assert parse_quantization_config(omega) == parse_quantization_config(yacs)
        build_model(omega)
    assert build_model(omega).quantization_config.spec.weight.bits == 4
    bad = OmegaConf.create(load_cfg(QUANTIZED, "MODEL.QUANTIZATION.QUANTIZER_LR_FACTOR", -1.0).dump())
    with pytest.raises(ValueError, match=r"QUANTIZER_LR_FACTOR: must be a number >= 0"):
        build_model(bad)
