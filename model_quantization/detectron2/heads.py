"""Which submodules of a detector are its "heads", per meta-architecture (for ``SCOPE: backbone``).

The published recipes compare "Quantize-All" (everything) with "Quantize-Backbone" (backbone and FPN
quantized, detection heads in float). ``MODEL.QUANTIZATION.SCOPE: "backbone"`` turns into one skip rule
per head prefix of the model's meta-architecture, looked up in :data:`HEADS`.

Contract: ``HEADS.register(name, prefixes)`` maps a meta-architecture class name to the qualified names of
its head submodules; a prefix that the built model lacks is ignored (e.g. an optional mask head).
"""

from __future__ import annotations

from torch import nn

from ..registry import did_you_mean
from ..spec import Rule

__all__ = ["HEADS", "head_skip_rules"]

SCOPES = ("all", "backbone")


class _HeadRegistry(dict):
    def register(self, meta_architecture: str, prefixes: tuple[str, ...]) -> None:
        self[meta_architecture] = tuple(prefixes)


HEADS = _HeadRegistry()
HEADS.register("RetinaNet", ("head",))
HEADS.register("GeneralizedRCNN", ("proposal_generator", "roi_heads"))
HEADS.register("ProposalNetwork", ("proposal_generator",))


def head_skip_rules(model: nn.Module, scope: str) -> tuple[Rule, ...]:
    """Skip rules that keep the heads of ``model`` in float for ``scope == "backbone"`` (none for "all")."""
    if scope not in SCOPES:
        raise ValueError(f"MODEL.QUANTIZATION.SCOPE: unknown scope {scope!r}: {did_you_mean(scope, SCOPES)}")
    if scope == "all":
        return ()
    from .. import adelaidet  # noqa: F401  (registers AdelaiDet's meta-architectures)

    arch = type(model).__name__
    if arch not in HEADS:
        raise ValueError(
            f"MODEL.QUANTIZATION.SCOPE: backbone: the heads of {arch} are not known; register them with "
            f"model_quantization.detectron2.heads.HEADS.register({arch!r}, (...)) (known: {', '.join(sorted(HEADS))})"
        )
    children = {name for name, _ in model.named_children()}
    return tuple(Rule(pattern=prefix, skip=True) for prefix in HEADS[arch] if prefix in children)
