"""The one registry type of the package (the detectron2/fvcore pattern) with helpful lookup errors.

Registries are how configuration strings and module types become code: the spec names a quantization
method (``"lsq"``) and :data:`model_quantization.quantizers.QUANTIZERS` turns it into a class; a float
module type (``nn.Conv2d``) finds its quantized class in :data:`model_quantization.nn.QUANTIZED_MODULES`;
a meta-architecture name finds its head prefixes in :data:`model_quantization.architectures.HEADS`. A
misspelt name must fail loudly and point at what the user probably meant, never fall back to something
else.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "close_matches", "did_you_mean"]


def close_matches(word: str, candidates: list[str] | tuple[str, ...] | set[str], n: int = 3) -> list[str]:
    """Return up to ``n`` candidates that look like ``word`` (difflib ratio >= 0.5), best first."""
    return difflib.get_close_matches(word, sorted(candidates), n=n, cutoff=0.5)


def did_you_mean(word: str, candidates: list[str] | tuple[str, ...] | set[str]) -> str:
    """Format a ``did you mean ...?`` hint, or list all valid names when nothing is close."""
    matches = close_matches(word, candidates)
    if matches:
        return "did you mean " + " or ".join(repr(m) for m in matches) + "?"
    return "valid names: " + ", ".join(repr(c) for c in sorted(candidates))


def _key_name(key: Hashable) -> str:
    return key.__qualname__ if isinstance(key, type) else str(key)


class Registry(Generic[T]):
    """Maps keys (names, or classes for type-keyed registries) to objects.

    Args:
        name: what is registered, used in error messages (e.g. ``"quantization method"``).
        on_register: called as ``on_register(key, obj)`` when an object is registered, e.g. to tell a
            class the name it is registered under.

    Example::

        QUANTIZERS = Registry("quantization method")

        @QUANTIZERS.register("lsq")
        class LSQQuantizer(Quantizer): ...

        QUANTIZERS.get("lsq")  # -> LSQQuantizer
        HEADS.add("RetinaNet", ("head",))  # a plain value

    Type-keyed registries look a class up along its MRO with :meth:`for_type`, so a subclass is handled
    by its nearest registered base.
    """

    def __init__(self, name: str, on_register: Callable[[Hashable, T], None] | None = None) -> None:
        self._name = name
        self._on_register = on_register
        self._entries: dict[Hashable, T] = {}

    def add(self, key: Hashable, obj: T) -> T:
        """Register ``obj`` under ``key``; registering a key twice is an error. Returns ``obj``."""
        if key in self._entries:
            raise KeyError(f"{self._name} {_key_name(key)!r} is already registered to {self._entries[key]!r}")
        self._entries[key] = obj
        if self._on_register is not None:
            self._on_register(key, obj)
        return obj

    def register(self, key: Hashable) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda obj: self.add(key, obj)

    def get(self, key: Hashable) -> T:
        """Return the object registered as ``key``; ``ValueError`` naming close matches otherwise."""
        try:
            return self._entries[key]
        except (KeyError, TypeError):
            names = [_key_name(k) for k in self._entries]
            raise ValueError(
                f"unknown {self._name} {_key_name(key)!r}: {did_you_mean(_key_name(key), names)}"
            ) from None

    def for_type(self, cls: type) -> T | None:
        """The object registered for the nearest class in ``cls``'s MRO, or None (type-keyed registries)."""
        for klass in cls.__mro__:
            if klass in self._entries:
                return self._entries[klass]
        return None

    def names(self) -> tuple[str, ...]:
        """All registered keys as names, sorted."""
        return tuple(sorted(_key_name(k) for k in self._entries))

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._entries
        except TypeError:  # unhashable (e.g. a list from a malformed config): certainly not registered
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self._name!r}, names={list(self.names())})"
