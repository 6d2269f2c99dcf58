"""What a quantizer is built from: a :class:`QuantizerRecipe` and its method's typed options dataclass.

A recipe says which method, how many bits (``None`` = off), signed or not, per tensor or per output
channel, and the method's options. Each method declares its options as one frozen dataclass (a subclass
of :class:`QuantizerOptions`) that holds the defaults, parses a plain mapping with type checks (a boolean
must be a boolean, a number a number) and validates the values against the rest of the recipe. Every
check of a recipe lives here, in :meth:`QuantizerRecipe.validate`, and every error is a ``ValueError``
that names the setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from model_quantization.registry import Registry, did_you_mean

__all__ = [
    "GRANULARITIES",
    "MAX_BITS",
    "OFF",
    "QUANTIZERS",
    "ROLES",
    "DataDrivenOptions",
    "QuantizerOptions",
    "QuantizerRecipe",
    "check_keys",
    "parse_bits",
]

GRANULARITIES = ("per_tensor", "per_channel")
ROLES = ("weight", "activation")
MAX_BITS = 8
OFF = "off"
_RECIPE_KEYS = ("method", "bits", "signed", "granularity", "options")


def _type_name(kind: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def _check_typed(value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked against a field annotation (bool, int, float, str, ``X | None``); floats are
    returned as floats. Booleans are never numbers and numbers never booleans (YAML's ``yes``/``no``)."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    expected = " or ".join(_type_name(k) if k is not type(None) else "null" for k in allowed)
    raise ValueError(f"{where}: must be {expected}, got {value!r}")


@dataclass(frozen=True)
class QuantizerOptions:
    """Base of every method's options: a frozen dataclass whose fields are the options and their defaults.

    Subclasses add typed fields (``bool``, ``int``, ``float``, ``str`` or ``X | None``) and override
    :meth:`check` for value ranges and combinations with the recipe.
    """

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "options") -> QuantizerOptions:
        """Parse ``data`` (option name -> value): unknown names and wrongly typed values are errors."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping of option names to values, got {data!r}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        values = {}
        for key, value in data.items():
            if key not in names:
                valid = names or ["(this method has no options)"]
                raise ValueError(f"{where}: unknown option {key!r}: {did_you_mean(str(key), valid)}")
            values[key] = _check_typed(value, hints[key], f"{where}.{key}")
        return cls(**values)

    def check(self, recipe: QuantizerRecipe, role: str) -> None:
        """Raise ``ValueError`` ("option: why") if a value does not fit the recipe (hook for subclasses)."""


@dataclass(frozen=True)
class DataDrivenOptions(QuantizerOptions):
    """Options of methods whose state is estimated from the first batches.

    Attributes:
        init_batches: number of first batches whose estimates are averaged into the initial state.
    """

    init_batches: int = 1

    def check(self, recipe: QuantizerRecipe, role: str) -> None:
        if self.init_batches < 1:
            raise ValueError(f"init_batches: must be an integer >= 1, got {self.init_batches!r}")


def parse_bits(value: Any, where: str) -> int | None:
    """``"off"``/``None`` -> None; an integer in [1, MAX_BITS] -> itself; anything else is an error."""
    if value is None or value == OFF and isinstance(value, str):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BITS:
        raise ValueError(f"{where}.bits: must be an integer in [1, {MAX_BITS}] or 'off', got {value!r}")
    return value


def _set_method_name(name: str, cls: type) -> None:
    cls.method = name


#: Method name -> quantizer class (:class:`~model_quantization.quantizers.base.Quantizer` subclasses).
#: Registering a class sets its ``method``. It lives here, beside the recipes that name the methods.
QUANTIZERS: Registry[type] = Registry("quantization method", on_register=_set_method_name)


def check_keys(data: Any, valid: tuple[str, ...], where: str) -> None:
    """``ValueError`` unless ``data`` is a mapping whose keys are all in ``valid`` (naming close ones)."""
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{where}: expected a mapping with keys {', '.join(valid)}, got {type(data).__name__}"
        )
    for key in data:
        if key not in valid:
            raise ValueError(f"unknown key {key!r} in {where}: {did_you_mean(str(key), valid)}")


@dataclass(frozen=True)
class QuantizerRecipe:
    """How to build one quantizer: method, bit width (``None`` = off), signedness, granularity, options.

    ``options`` is the mapping as written (so rule overrides can merge it key by key and ``to_dict``
    round-trips); :meth:`validate` parses it into the method's options dataclass.
    """

    method: str = "lsq"
    bits: int | None = 4
    signed: bool = True
    granularity: str = "per_tensor"
    options: Mapping[str, Any] = field(default_factory=dict)

    KEYS: ClassVar[tuple[str, ...]] = _RECIPE_KEYS

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "recipe", base: QuantizerRecipe | None = None):
        """Parse a recipe dict; with ``base``, only the given keys override it (rule overrides).

        Only the keys and their plain types are checked here; :meth:`validate` checks the combination.
        """
        check_keys(data, _RECIPE_KEYS, where)
        base = base or cls()
        fields = dict(method=base.method, bits=base.bits, signed=base.signed, granularity=base.granularity)
        options = dict(base.options)
        if "method" in data:
            method = data["method"]
            if not isinstance(method, str) or method not in QUANTIZERS:
                raise ValueError(
                    f"{where}.method: unknown quantization method {method!r}: "
                    f"{did_you_mean(str(method), QUANTIZERS.names())}"
                )
            if method != base.method:
                options = {}  # options belong to a method; a new method starts from its own defaults
            fields["method"] = method
        if "bits" in data:
            fields["bits"] = parse_bits(data["bits"], where)
        if "signed" in data:
            fields["signed"] = _check_typed(data["signed"], bool, f"{where}.signed")
        if "granularity" in data:
            if data["granularity"] not in GRANULARITIES:
                raise ValueError(
                    f"{where}.granularity: unknown granularity {data['granularity']!r}: "
                    f"{did_you_mean(str(data['granularity']), GRANULARITIES)}"
                )
            fields["granularity"] = data["granularity"]
        if "options" in data:
            if not isinstance(data["options"], Mapping):
                raise ValueError(f"{where}.options: expected a mapping, got {type(data['options']).__name__}")
            options.update(data["options"])
        return cls(**fields, options=options)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "method": self.method,
            "bits": OFF if self.bits is None else self.bits,
            "signed": self.signed,
            "granularity": self.granularity,
        }
        if self.options:
            data["options"] = dict(self.options)
        return data

    @property
    def quantizer_class(self) -> type:
        """The registered class of :attr:`method` (``ValueError`` with close names if unknown)."""
        return QUANTIZERS.get(self.method)

    def validate(self, role: str, where: str | None = None) -> QuantizerOptions:
        """Check the recipe for ``role`` against its method's contract; return the parsed options.

        Raises:
            ValueError: prefixed with ``where`` (default: the method name), naming the bad setting.
        """
        where = where or self.method
        try:
            cls = QUANTIZERS.get(self.method)
        except ValueError as exc:
            raise ValueError(f"{where}.method: {exc}") from None
        name = self.method
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}: {did_you_mean(str(role), ROLES)}")
        if role not in cls.roles:
            raise ValueError(f"{where}: {name} cannot quantize {role}s (supports: {', '.join(cls.roles)})")
        parse_bits(self.bits, where)
        if self.bits is not None:
            low, high = cls.bit_range
            if not low <= self.bits <= high:
                raise ValueError(
                    f"{where}.bits: {name} supports bits in [{low}, {high}] or 'off', got {self.bits!r}"
                )
        _check_typed(self.signed, bool, f"{where}.signed")
        if self.signed not in cls.signedness[role]:
            raise ValueError(
                f"{where}.signed: {name} {role}s must be {'signed' if not self.signed else 'unsigned'} "
                f"(signed={self.signed} is not supported)"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"{where}.granularity: unknown granularity {self.granularity!r}: "
                f"{did_you_mean(str(self.granularity), GRANULARITIES)}"
            )
        if self.granularity == "per_channel" and role != "weight":
            raise ValueError(f"{where}.granularity: 'per_channel' is only supported for weights, not {role}s")
        options = cls.Options.from_mapping(self.options, f"{where}.options")
        try:
            options.check(self, role)
        except ValueError as exc:
            raise ValueError(f"{where}.options.{exc}") from None
        return options
