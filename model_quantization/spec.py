"""The quantization spec: a default weight/activation recipe plus ordered name rules, fully validated.

Schema (``QuantSpec.from_dict`` / ``QuantSpec.to_dict``)::

    {
        "weight":     {"method": "lsq", "bits": 2, "signed": True, "granularity": "per_tensor",
                       "options": {"grad_scale": True}},
        "activation": {"method": "lsq", "bits": 2, "signed": False},
        "align_add_inputs": False,
        "rules": [
            # first conv and last prediction convs at 8 bits ("M2F8L8")
            {"pattern": "backbone.stem.conv1", "weight": {"bits": 8}, "activation": {"bits": 8, "signed": True}},
            {"pattern": "head.cls_score", "weight": {"bits": 8}, "activation": {"bits": 8}},
            # heads in float ("Quantize-Backbone")
            {"pattern": "roi_heads", "skip": True},
        ],
    }

Recipe fields (all optional, defaults shown by :class:`QuantizerRecipe`): ``method`` (a name registered in
:data:`~model_quantization.quantizers.QUANTIZERS`), ``bits`` (1..8 or ``"off"``), ``signed``,
``granularity`` (``"per_tensor"``/``"per_channel"``; activations are always per-tensor) and ``options``
(the method's keyword-only constructor options).

Rules are matched with :func:`fnmatch.fnmatchcase` against a module's qualified name *and the names of its
ancestors*, so ``"roi_heads"`` covers everything inside ``roi_heads``. Every matching rule applies, in
order: overrides replace the recipe fields they name (a rule that changes ``method`` starts from empty
options; otherwise options merge key by key). A rule is either ``skip: true`` or an override, never both,
and a module matched by both a skip rule and an override rule is an error (raised by ``convert``), as is a
rule that matches no quantizable module. ``align_add_inputs`` makes residual/FPN sums quantize both
summands with one shared quantizer.

Every validation error is a ``ValueError`` that names the key or pattern and suggests the closest valid
names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from model_quantization.quantizers import QuantizerRecipe
from model_quantization.quantizers.recipe import check_keys

__all__ = ["QuantSpec", "QuantizerRecipe", "Resolution", "Rule"]

_RULE_KEYS = ("pattern", "skip", "weight", "activation")
_SPEC_KEYS = ("weight", "activation", "rules", "align_add_inputs")


@dataclass(frozen=True)
class Rule:
    """``pattern -> skip`` or ``pattern -> overrides`` (partial recipe dicts for weight and/or activation)."""

    pattern: str
    skip: bool = False
    weight: Mapping[str, Any] | None = None
    activation: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> Rule:
        check_keys(data, _RULE_KEYS, where)
        if not isinstance(data.get("pattern"), str) or not data["pattern"]:
            raise ValueError(
                f"{where}.pattern: a non-empty glob string is required, got {data.get('pattern')!r}"
            )
        skip = data.get("skip", False)
        if not isinstance(skip, bool):
            raise ValueError(f"{where} ({data['pattern']!r}).skip: must be true or false, got {skip!r}")
        weight, activation = data.get("weight"), data.get("activation")
        for role, override in (("weight", weight), ("activation", activation)):
            if override is not None:
                check_keys(override, QuantizerRecipe.KEYS, f"{where} ({data['pattern']!r}).{role}")
        return cls(
            pattern=data["pattern"],
            skip=skip,
            weight=None if weight is None else dict(weight),
            activation=None if activation is None else dict(activation),
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"pattern": self.pattern}
        if self.skip:
            data["skip"] = True
        if self.weight is not None:
            data["weight"] = dict(self.weight)
        if self.activation is not None:
            data["activation"] = dict(self.activation)
        return data

    @property
    def is_override(self) -> bool:
        return bool(self.weight) or bool(self.activation)

    def matches(self, name: str) -> bool:
        """True if the pattern matches ``name`` or one of its ancestors (``a``, ``a.b`` for ``a.b.c``)."""
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[:i]), self.pattern) for i in range(1, len(parts) + 1))


@dataclass(frozen=True)
class Resolution:
    """What the spec says about one module: skipped (by which rule) or the effective recipes.

    Attributes:
        skip_rule: the pattern of the first skip rule that matched, or None.
        weight, activation: the effective recipes.
        rules: the patterns of every rule that matched, in order.
        indices: their positions in ``QuantSpec.rules``.
    """

    skip_rule: str | None
    weight: QuantizerRecipe
    activation: QuantizerRecipe
    rules: tuple[str, ...]
    indices: tuple[int, ...] = ()


@dataclass(frozen=True)
class QuantSpec:
    """Default recipes for weights and activations, plus ordered name rules. Validated on construction."""

    weight: QuantizerRecipe = field(default_factory=lambda: QuantizerRecipe(signed=True))
    activation: QuantizerRecipe = field(default_factory=lambda: QuantizerRecipe(signed=False))
    rules: tuple[Rule, ...] = ()
    align_add_inputs: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        self.validate()

    # ------------------------------------------------------------------------------------- (de)serialise

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        """Build and validate a spec from a nested dict (e.g. parsed YAML); see the module docstring."""
        check_keys(data, _SPEC_KEYS, "quantization spec")
        # An empty YAML section (``rules:``) parses as None: treat it like an absent one.
        weight = QuantizerRecipe.from_dict(data.get("weight") or {}, "weight", QuantizerRecipe(signed=True))
        activation = QuantizerRecipe.from_dict(
            data.get("activation") or {}, "activation", QuantizerRecipe(signed=False)
        )
        rules_data = data.get("rules") or []
        if isinstance(rules_data, str | bytes | Mapping) or not hasattr(rules_data, "__iter__"):
            raise ValueError(f"rules: expected a list of rule mappings, got {type(rules_data).__name__}")
        rules = tuple(Rule.from_dict(rule, f"rules[{i}]") for i, rule in enumerate(rules_data))
        align = data.get("align_add_inputs", False)
        if not isinstance(align, bool):
            raise ValueError(f"align_add_inputs: must be true or false, got {align!r}")
        return cls(weight=weight, activation=activation, rules=rules, align_add_inputs=align)

    def to_dict(self) -> dict[str, Any]:
        """The dict form; ``QuantSpec.from_dict(spec.to_dict()) == spec``."""
        return {
            "weight": self.weight.to_dict(),
            "activation": self.activation.to_dict(),
            "align_add_inputs": self.align_add_inputs,
            "rules": [rule.to_dict() for rule in self.rules],
        }

    # ------------------------------------------------------------------------------------- validation

    def validate(self) -> None:
        """Check every recipe a rule can produce and every rule for contradictions."""
        self.weight.validate("weight", "weight")
        self.activation.validate("activation", "activation")
        seen: dict[str, tuple[int, Rule]] = {}
        for i, rule in enumerate(self.rules):
            where = f"rules[{i}] ({rule.pattern!r})"
            if rule.skip and rule.is_override:
                raise ValueError(
                    f"{where}: 'skip: true' contradicts its weight/activation overrides; use two rules"
                )
            if not rule.skip and not rule.is_override:
                raise ValueError(f"{where}: a rule needs 'skip: true' or a weight/activation override")
            if rule.pattern in seen and seen[rule.pattern][1] != rule:
                first = seen[rule.pattern][0]
                raise ValueError(
                    f"{where}: contradicts rules[{first}], which has the same pattern but other settings"
                )
            seen.setdefault(rule.pattern, (i, rule))
            # Validate the recipe this override produces on top of the defaults.
            for role, base in (("weight", self.weight), ("activation", self.activation)):
                override = getattr(rule, role)
                if override:
                    QuantizerRecipe.from_dict(override, f"{where}.{role}", base).validate(
                        role, f"{where}.{role}"
                    )

    # ------------------------------------------------------------------------------------- resolution

    def resolve(self, name: str) -> Resolution:
        """Effective recipes for the module called ``name`` (``ValueError`` on skip/override conflicts)."""
        weight, activation = self.weight, self.activation
        applied: list[str] = []
        indices: list[int] = []
        skip_rule = override_rule = None
        for i, rule in enumerate(self.rules):
            if not rule.matches(name):
                continue
            applied.append(rule.pattern)
            indices.append(i)
            if rule.skip:
                skip_rule = skip_rule or rule.pattern
                continue
            override_rule = override_rule or rule.pattern
            where = f"rules[{i}] ({rule.pattern!r})"
            if rule.weight:
                weight = QuantizerRecipe.from_dict(rule.weight, f"{where}.weight", weight)
                weight.validate("weight", f"{where}.weight (for {name!r})")
            if rule.activation:
                activation = QuantizerRecipe.from_dict(rule.activation, f"{where}.activation", activation)
                activation.validate("activation", f"{where}.activation (for {name!r})")
        if skip_rule and override_rule:
            raise ValueError(
                f"module {name!r} is matched by skip rule {skip_rule!r} and by override rule {override_rule!r}; "
                f"these contradict each other: narrow one of the patterns"
            )
        return Resolution(skip_rule, weight, activation, tuple(applied), tuple(indices))
