"""How a float module becomes a quantized one: class swap, weight substitution, type -> handler registry.

Conversion does not rebuild modules. It swaps the instance's class for a quantized subclass *of the
instance's own class* and attaches quantizer submodules (the technique ``torch.nn.utils.parametrize``
uses). Consequences that matter:

* every attribute survives: parameter names (``weight``, ``bias``) and hence checkpoints, hooks, and
  extra submodules such as detectron2's ``Conv2d.norm`` / ``Conv2d.activation``;
* the float class's own ``forward`` still runs. A quantized weight module quantizes its input, then
  calls the float ``forward`` while ``self.weight`` temporarily resolves to the fake-quantized weight.
  A ``Conv2d`` subclass that applies ``conv -> norm -> activation`` inside ``forward`` therefore keeps
  doing exactly that, with quantized input and weight. The substitution lives in the module's
  ``_parameters`` dict for the duration of the call only, so ``parameters()``, ``state_dict()`` and the
  optimiser always see the float parameter;
* ``isinstance(qmodule, type_of_float_module)`` stays true, so code that dispatches on type still works.

Which quantized class handles which float type is a registry keyed by type and looked up along the MRO,
so a subclass of ``nn.Conv2d`` is handled by :class:`QConv2d` unless a more specific handler is
registered with :func:`register_quantized_module`.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from model_quantization.quantizers import Quantizer
from model_quantization.registry import Registry

__all__ = [
    "QUANTIZED_MODULES",
    "QuantizedModule",
    "QuantizedWeightModule",
    "quantized_class",
    "quantized_module_for",
    "register_quantized_module",
]


def _set_float_type(float_type: type[nn.Module], qcls: type[QuantizedModule]) -> None:
    qcls.float_type = float_type


#: float module type -> the quantized class that converts it (and its subclasses).
QUANTIZED_MODULES: Registry[type[QuantizedModule]] = Registry("quantized module for", _set_float_type)
_DYNAMIC_CLASSES: dict[tuple[type, type], type] = {}


def register_quantized_module(float_type: type[nn.Module]):
    """Class decorator: ``qcls`` converts modules whose type is ``float_type`` or a subclass of it."""
    return QUANTIZED_MODULES.register(float_type)


def quantized_module_for(module_type: type[nn.Module]) -> type[QuantizedModule] | None:
    """The handler for ``module_type``: the registration of the nearest class in its MRO, or ``None``.

    Already-quantized modules have no handler (conversion is not applied twice).
    """
    if issubclass(module_type, QuantizedModule):
        return None
    return QUANTIZED_MODULES.for_type(module_type)


def quantized_class(qbase: type[QuantizedModule], float_cls: type[nn.Module]) -> type[QuantizedModule]:
    """``qbase`` itself for its exact float type, else a cached subclass of both ``qbase`` and ``float_cls``.

    The MRO of ``QConv2d[Sub]`` is ``QConv2d[Sub], QConv2d, QuantizedWeightModule, ..., Sub, nn.Conv2d``:
    the quantized forward runs first and its ``super().forward`` reaches ``Sub.forward``.
    """
    if float_cls is qbase.float_type:
        return qbase
    key = (qbase, float_cls)
    if key not in _DYNAMIC_CLASSES:
        name = f"{qbase.__name__}[{float_cls.__name__}]"
        _DYNAMIC_CLASSES[key] = type(
            name,
            (qbase, float_cls),
            {"__module__": qbase.__module__, "_dynamic_key": key, "__qualname__": name},
        )
    return _DYNAMIC_CLASSES[key]


def _rebuild(qbase: type[QuantizedModule], float_cls: type[nn.Module]) -> nn.Module:
    """Unpickling helper: an empty instance of the dynamic class (state is restored by ``__setstate__``)."""
    cls = quantized_class(qbase, float_cls)
    return cls.__new__(cls)


class QuantizedModule:
    """Mixin for quantized modules; must come before the float class in the bases.

    Subclasses are registered with :func:`register_quantized_module` and implement :meth:`attach`.
    """

    #: The float class this quantized class replaces (set by :func:`register_quantized_module`).
    float_type: ClassVar[type[nn.Module]]
    #: For dynamically created subclasses: (quantized base, float class).
    _dynamic_key: ClassVar[tuple[type, type] | None] = None

    @classmethod
    def from_float(cls, module: nn.Module, **quantizers: Quantizer) -> nn.Module:
        """Convert ``module`` **in place** (its class changes) and return it.

        Args:
            module: an instance of ``cls.float_type`` or of a subclass.
            quantizers: the quantizer submodules to attach, by attribute name (see :meth:`attach`).
        """
        if isinstance(module, QuantizedModule):
            raise TypeError(f"{type(module).__name__} is already quantized")
        if not isinstance(module, cls.float_type):
            raise TypeError(
                f"{cls.__name__}.from_float expects a {cls.float_type.__name__}, got {type(module)}"
            )
        module.__class__ = quantized_class(cls, type(module))
        module.attach(**quantizers)
        return module

    @property
    def float_class(self) -> type[nn.Module]:
        """The class the module had before conversion."""
        key = type(self)._dynamic_key
        return key[1] if key else type(self).float_type

    def attach(self, **quantizers: Quantizer) -> None:
        """Register the quantizer submodules (implemented by subclasses)."""
        raise NotImplementedError

    def quantizers(self) -> dict[str, Quantizer]:
        """The attached quantizers by attribute name."""
        return {name: m for name, m in self.named_children() if isinstance(m, Quantizer)}

    def __reduce_ex__(self, protocol: int) -> Any:
        # Dynamic classes cannot be found by name when unpickling; rebuild them from their two bases.
        key = type(self)._dynamic_key
        if key is None:
            return super().__reduce_ex__(protocol)
        return _rebuild, key, self.__dict__


def _compact_saved_input(quantizer: Quantizer, quantized: torch.Tensor) -> contextlib.AbstractContextManager:
    """While the layer runs, autograd keeps its quantized input as the quantizer's compact codes.

    Float training saves a conv's input, which usually is the very tensor the previous ReLU/BN already
    saved; quantized training saves a *new* tensor, the fake-quantized input, costing one activation per
    layer. Stored as int8 codes it costs a quarter of that; it is expanded, bit-identical, in backward.
    """
    if not (torch.is_grad_enabled() and quantizer.enabled and quantized.requires_grad):
        return contextlib.nullcontext()

    def pack(saved: torch.Tensor) -> Any:
        if (
            saved.data_ptr() == quantized.data_ptr()
            and saved.shape == quantized.shape
            and saved.stride() == quantized.stride()
            and saved.dtype == quantized.dtype
        ):
            packed = quantizer.compact(saved.detach())
            if packed is not None:
                return _Compact(quantizer, packed)
        return saved

    def unpack(packed: Any) -> torch.Tensor:
        return packed.quantizer.expand(packed.data) if isinstance(packed, _Compact) else packed

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class _Compact(NamedTuple):
    quantizer: Quantizer
    data: Any


class QuantizedWeightModule(QuantizedModule):
    """Quantizes the first input and the ``weight`` parameter around the float class's ``forward``.

    Attributes:
        input_quantizer: applied to the first positional input (the activation).
        weight_quantizer: applied to ``weight`` on every call, so training updates are seen.
    """

    #: Output-channel axis of ``weight`` (for per-channel weight quantization).
    weight_channel_axis: ClassVar[int] = 0

    def attach(self, *, weight_quantizer: Quantizer, input_quantizer: Quantizer) -> None:
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        input = self.input_quantizer(input)
        if torch.compiler.is_compiling():
            # Under torch.compile the compiler decides what backward keeps (it may recompute the fake-quant
            # rather than saving its output), and saved-tensor hooks would break the graph.
            return self._forward_with_quantized_weight(input, args, kwargs)
        with _compact_saved_input(self.input_quantizer, input):
            return self._forward_with_quantized_weight(input, args, kwargs)

    def _forward_with_quantized_weight(self, input: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if not self.weight_quantizer.enabled:
            return super().forward(input, *args, **kwargs)
        # The substitution lives in _parameters for this call only (try/finally: torch.compile traces it).
        params = self._parameters
        original = params["weight"]
        params["weight"] = self.weight_quantizer(original)
        try:
            return super().forward(input, *args, **kwargs)
        finally:
            params["weight"] = original
