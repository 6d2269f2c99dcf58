"""A small name -> object registry (the detectron2/fvcore pattern) with helpful lookup errors.

Registries are how configuration strings become code: the spec names a quantization method ("lsq") and
:data:`model_quantization.quantizers.QUANTIZERS` turns it into a class. A misspelt name must fail loudly
and point at what the user probably meant, never fall back to something else.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def close_matches(word: str, candidates: list[str] | tuple[str, ...] | set[str], n: int = 3) -> list[str]:
    """Return up to ``n`` candidates that look like ``word`` (difflib ratio >= 0.5), best first."""
    return difflib.get_close_matches(word, sorted(candidates), n=n, cutoff=0.5)


def did_you_mean(word: str, candidates: list[str] | tuple[str, ...] | set[str]) -> str:
    """Format a ``did you mean ...?`` hint, or list all valid names when nothing is close."""
    matches = close_matches(word, candidates)
    if matches:
        return "did you mean " + " or ".join(repr(m) for m in matches) + "?"
    return "valid names: " + ", ".join(repr(c) for c in sorted(candidates))


class Registry(Generic[T]):
    """Maps names to objects (usually classes).

    Args:
        name: what is registered, used in error messages (e.g. ``"quantization method"``).

    Example::

        QUANTIZERS = Registry("quantization method")

        @QUANTIZERS.register("lsq")
        class LSQQuantizer(Quantizer): ...

        QUANTIZERS.get("lsq")  # -> LSQQuantizer
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering an object under ``name``; registering a name twice is an error."""

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self._name} {name!r} is already registered to {self._entries[name]!r}")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Return the object registered as ``name``; ``ValueError`` naming close matches otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self._name} {name!r}: {did_you_mean(name, self.names())}") from None

    def names(self) -> tuple[str, ...]:
        """All registered names, sorted."""
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self._name!r}, names={list(self.names())})"
