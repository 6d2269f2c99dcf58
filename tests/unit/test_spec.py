"""QuantSpec: dict round trip, rule resolution, and every validation error (key named, close names suggested)."""

from __future__ import annotations

import pytest

from model_quantization.spec import QuantizerRecipe, QuantSpec, Rule

EXAMPLE = {
    "weight": {"method": "lsq", "bits": 2, "granularity": "per_channel", "options": {"grad_scale": True}},
    "activation": {"method": "lsq", "bits": 2, "signed": False},
    "align_add_inputs": True,
    "rules": [
        {"pattern": "backbone.stem.conv1", "weight": {"bits": 8}, "activation": {"bits": 8, "signed": True}},
        {"pattern": "head.*_pred", "weight": {"bits": 8}, "activation": {"bits": 8}},
        {"pattern": "roi_heads", "skip": True},
        {
            "pattern": "backbone.res5.*",
            "weight": {"method": "dorefa", "bits": 3, "granularity": "per_tensor"},
        },
    ],
}


def test_dict_round_trip():
    spec = QuantSpec.from_dict(EXAMPLE)
    again = QuantSpec.from_dict(spec.to_dict())
    assert again == spec
    assert again.to_dict() == spec.to_dict()
    assert spec.weight == QuantizerRecipe("lsq", 2, True, "per_channel", {"grad_scale": True})
    assert spec.rules[2] == Rule("roi_heads", skip=True)
    assert spec.to_dict()["rules"][0] == EXAMPLE["rules"][0]


def test_defaults_and_off():
    assert QuantSpec.from_dict({"weight": None, "rules": None}) == QuantSpec()  # empty YAML sections
    spec = QuantSpec.from_dict({"activation": {"bits": "off"}})
    assert spec.activation.bits is None and spec.to_dict()["activation"]["bits"] == "off"
    assert spec.weight.signed and not spec.activation.signed


def test_rules_cascade_in_order_and_match_ancestors():
    spec = QuantSpec.from_dict(EXAMPLE)
    stem = spec.resolve("backbone.stem.conv1")
    assert (stem.weight.bits, stem.activation.bits, stem.activation.signed) == (8, 8, True)
    assert stem.weight.granularity == "per_channel"  # untouched fields are inherited
    assert spec.resolve("roi_heads.box_head.fc1").skip_rule == "roi_heads"  # ancestor match
    res5 = spec.resolve("backbone.res5.0.conv2")
    assert res5.weight.method == "dorefa" and res5.weight.options == {}  # a new method drops lsq options
    assert res5.activation.method == "lsq"
    plain = spec.resolve("backbone.res2.0.conv1")
    assert plain.rules == () and plain.weight == spec.weight


@pytest.mark.parametrize(
    "data,message",
    [
        ({"rule": []}, r"unknown key 'rule' in quantization spec: did you mean 'rules'"),
        ({"weight": {"bit": 4}}, r"unknown key 'bit' in weight: did you mean 'bits'"),
        (
            {"weight": {"method": "lqs"}},
            r"weight\.method: unknown quantization method 'lqs': did you mean 'lsq'",
        ),
        ({"activation": {"bits": 9}}, r"activation\.bits: must be an integer in \[1, 8\] or 'off', got 9"),
        ({"activation": {"bits": 0}}, r"activation\.bits"),
        ({"weight": {"bits": "four"}}, r"weight\.bits"),
        ({"weight": {"granularity": "per-channel"}}, r"weight\.granularity.*did you mean 'per_channel'"),
        (
            {"activation": {"granularity": "per_channel"}},
            r"activation\.granularity: .*only supported for weights",
        ),
        (
            {"weight": {"options": {"grad_scal": False}}},
            r"weight\.options: unknown option 'grad_scal': did you mean 'grad_scale'",
        ),
        ({"weight": {"method": "dorefa", "signed": False}}, r"weight\.signed: dorefa weights must be signed"),
        (
            {"activation": {"method": "pact", "signed": True}},
            r"activation\.signed: pact activations must be unsigned",
        ),
        ({"weight": {"method": "binary", "bits": 4}}, r"weight\.bits: binary supports bits in \[1, 1\]"),
        (
            {"weight": {"method": "lqnet", "bits": 3, "options": {"ternary": True}}},
            r"weight\.options\.ternary: needs bits=2",
        ),
        (
            {"rules": [{"patern": "a", "skip": True}]},
            r"unknown key 'patern' in rules\[0\]: did you mean 'pattern'",
        ),
        (
            {"rules": [{"pattern": "a", "weight": {"bitz": 8}}]},
            r"unknown key 'bitz' in rules\[0\] \('a'\)\.weight: did you mean 'bits'",
        ),
        ({"rules": [{"pattern": "a", "activation": {"bits": 12}}]}, r"rules\[0\] \('a'\)\.activation\.bits"),
        (
            {"rules": [{"pattern": "head", "skip": True, "weight": {"bits": 8}}]},
            r"rules\[0\] \('head'\): 'skip: true' contradicts its weight/activation overrides",
        ),
        (
            {
                "rules": [
                    {"pattern": "stem", "weight": {"bits": 8}},
                    {"pattern": "stem", "weight": {"bits": 6}},
                ]
            },
            r"rules\[1\] \('stem'\): contradicts rules\[0\], which has the same pattern",
        ),
        (
            {"rules": [{"pattern": "stem"}]},
            r"rules\[0\] \('stem'\): a rule needs 'skip: true' or a weight/activation override",
        ),
        ({"rules": "stem"}, r"rules: expected a list"),
        ({"align_add_inputs": "yes"}, r"align_add_inputs: must be true or false"),
    ],
)
def test_validation_errors_name_the_key_and_suggest(data, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec.from_dict(data)


def test_spec_built_in_python_is_validated_too():
    with pytest.raises(ValueError, match=r"weight\.method: unknown quantization method 'lssq'.*'lsq'"):
        QuantSpec(weight=QuantizerRecipe(method="lssq"))
    with pytest.raises(ValueError, match="contradicts"):
        QuantSpec(rules=(Rule("a", skip=True, weight={"bits": 8}),))


def test_cascaded_overrides_are_validated_per_module():
    spec = QuantSpec.from_dict(
        {
            "rules": [
                {"pattern": "a*", "weight": {"method": "binary", "bits": 1}},
                {"pattern": "ab", "weight": {"bits": 4}},
            ]
        }
    )
    assert spec.resolve("a1").weight.method == "binary"
    with pytest.raises(
        ValueError, match=r"rules\[1\] \('ab'\)\.weight \(for 'ab'\)\.bits: binary supports bits"
    ):
        spec.resolve("ab")


def test_skip_and_override_matching_the_same_module_contradict():
    spec = QuantSpec.from_dict(
        {"rules": [{"pattern": "roi_heads", "skip": True}, {"pattern": "*.cls_score", "weight": {"bits": 8}}]}
    )
    with pytest.raises(
        ValueError,
        match=r"'roi_heads.box_predictor.cls_score'.*skip rule 'roi_heads'.*override rule '\*\.cls_score'",
    ):
        spec.resolve("roi_heads.box_predictor.cls_score")
