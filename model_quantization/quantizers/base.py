"""The quantizer contract shared by every method, and the registry that maps method names to classes.

Contract for a class registered in :data:`QUANTIZERS` (checked by ``tests/unit/test_registry.py`` for
every registered name):

* It subclasses :class:`Quantizer` and its constructor is
  ``Cls(bits, signed, granularity, role, channel_axis, num_channels, **options)`` where ``options`` are
  keyword-only and documented in the class docstring. ``bits=None`` means "off": the quantizer is the
  identity and holds no state.
* :meth:`Quantizer.check_config` validates a configuration *without* building a module, raising
  ``ValueError`` that names the offending setting; the spec uses it to reject bad configs before any
  model is touched.
* ``forward(x)`` returns a tensor of the same shape and dtype on the grid the configuration describes
  (at most ``2**bits`` distinct values per tensor or per channel; exactly 3 for ternary).
* Every piece of state (learned step sizes, observed ranges, "initialised" flags) is a parameter or a
  persistent buffer, so ``state_dict()``/``load_state_dict()`` reproduce outputs exactly and a loaded
  checkpoint is never re-initialised from data. A state dict holding *none* of a quantizer's keys (a
  float checkpoint loaded into a converted model) leaves its state untouched, so data-driven
  initialisation still happens.
* Data-driven initial values are averaged over DDP ranks (:mod:`model_quantization.distributed`).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from model_quantization.distributed import all_reduce_mean
from model_quantization.registry import Registry, did_you_mean

__all__ = ["GRANULARITIES", "MAX_BITS", "QUANTIZERS", "ROLES", "Quantizer"]

QUANTIZERS: Registry[type[Quantizer]] = Registry("quantization method")

GRANULARITIES = ("per_tensor", "per_channel")
ROLES = ("weight", "activation")
MAX_BITS = 8


class Quantizer(nn.Module):
    """Base class: bit width, signedness, granularity, role and the data-driven initialisation protocol.

    Args:
        bits: 1..8, or ``None`` for "off" (identity).
        signed: quantize to a grid with negative levels. Unsigned grids start at 0 and are only valid for
            non-negative inputs; negative values in the first batch raise ``ValueError`` (see
            :meth:`check_input`).
        granularity: ``"per_tensor"`` or ``"per_channel"`` (weights only: one scale per output channel).
        role: ``"weight"`` or ``"activation"``; some methods treat them differently (DoReFa, binary).
        channel_axis: the output-channel axis of the weight (0 for Conv2d/Linear, 1 for ConvTranspose2d).
        num_channels: size of that axis; required for per-channel state.

    Subclasses set :attr:`roles` and :attr:`signedness` (allowed combinations), and, when they have
    data-driven state, :attr:`data_driven` plus :meth:`_initial_values`.
    """

    #: Registry name, set by subclasses.
    method: ClassVar[str] = ""
    #: Roles this method supports.
    roles: ClassVar[tuple[str, ...]] = ROLES
    #: role -> allowed values of ``signed``.
    signedness: ClassVar[dict[str, tuple[bool, ...]]] = {"weight": (True,), "activation": (True, False)}
    #: Allowed bit widths (besides ``None``).
    bit_range: ClassVar[tuple[int, int]] = (1, MAX_BITS)
    #: Whether the method has state estimated from the first batch(es).
    data_driven: ClassVar[bool] = False

    def __init__(
        self,
        bits: int | None = 8,
        signed: bool = True,
        granularity: str = "per_tensor",
        role: str = "activation",
        channel_axis: int = 0,
        num_channels: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        # Subclasses pass their keyword-only options through so that one check validates everything.
        self.check_config(bits=bits, signed=signed, granularity=granularity, role=role, **options)
        if granularity == "per_channel" and bits is not None and not num_channels:
            raise ValueError(f"{self.method}: per_channel quantization needs num_channels")
        self.bits = bits
        self.signed = signed
        self.granularity = granularity
        self.role = role
        self.channel_axis = channel_axis
        self.num_channels = num_channels if granularity == "per_channel" else None
        #: Qualified name of the owning module, set by ``convert`` so errors can say where they happened.
        self.owner: str = ""
        # Per process, not state: the signedness check runs on the first batch this process sees.
        self._input_checked = False
        self._known_initialized = False
        if self.data_driven and bits is not None:
            self.register_buffer("initialized", torch.tensor(False))
            self.register_buffer("init_batches_seen", torch.tensor(0, dtype=torch.long))

    # ----------------------------------------------------------------------------------- configuration

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Names of the method-specific keyword-only options accepted by the constructor."""
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @classmethod
    def check_config(
        cls,
        bits: int | None,
        signed: bool,
        granularity: str = "per_tensor",
        role: str = "activation",
        **options: Any,
    ) -> None:
        """Raise ``ValueError`` if this combination is not meaningful for the method.

        The message names the offending setting and, for names, the closest valid ones.
        """
        name = cls.method or cls.__name__
        if role not in ROLES:
            raise ValueError(f"{name}: unknown role {role!r}: {did_you_mean(role, ROLES)}")
        if role not in cls.roles:
            raise ValueError(f"{name}: cannot quantize {role}s (supports: {', '.join(cls.roles)})")
        if bits is not None:
            low, high = cls.bit_range
            if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
                raise ValueError(f"{name}: bits must be an integer in [{low}, {high}] or 'off', got {bits!r}")
        if not isinstance(signed, bool):
            raise ValueError(f"{name}: signed must be true or false, got {signed!r}")
        if signed not in cls.signedness[role]:
            raise ValueError(
                f"{name}: {role}s must be {'signed' if not signed else 'unsigned'} for this method "
                f"(signed={signed} is not supported)"
            )
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"{name}: unknown granularity {granularity!r}: {did_you_mean(granularity, GRANULARITIES)}"
            )
        if granularity == "per_channel" and role != "weight":
            raise ValueError(f"{name}: granularity 'per_channel' is only supported for weights, not {role}s")
        valid = cls.option_names()
        for key in options:
            if key not in valid:
                raise ValueError(f"{name}: unknown option {key!r}: {did_you_mean(key, valid)}")
        cls.check_options(bits=bits, signed=signed, granularity=granularity, role=role, **options)

    @classmethod
    def check_options(
        cls, bits: int | None, signed: bool, granularity: str, role: str, **options: Any
    ) -> None:
        """Validate method-specific options (hook for subclasses; the base accepts anything)."""

    # ----------------------------------------------------------------------------------- properties

    @property
    def enabled(self) -> bool:
        """False when ``bits`` is off: the quantizer is the identity."""
        return self.bits is not None

    @property
    def bits_label(self) -> str:
        """Human-readable bit width for reports ("4", "ter", "off")."""
        return "off" if self.bits is None else str(self.bits)

    @property
    def is_initialized(self) -> bool:
        """Whether data-driven state has been set (always True for stateless methods)."""
        if self._known_initialized or not (self.data_driven and self.enabled):
            return True
        # Reading the buffer synchronises with the GPU; once it is True, remember that in Python so that
        # the forward pass stays asynchronous. Loading a state dict or resetting forgets it.
        self._known_initialized = bool(self.initialized)
        return self._known_initialized

    def _where(self) -> str:
        return f" in {self.owner!r}" if self.owner else ""

    # ----------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or x.numel() == 0:
            # Empty batches happen in detection heads (no proposals); they must not initialise anything.
            return x
        if not self._input_checked:
            self.check_input(x)
            self._input_checked = True
        if not self.is_initialized:
            self.initialize(x)
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the current state (subclasses implement)."""
        raise NotImplementedError

    def compact(self, out: torch.Tensor) -> Any | None:
        """An exact, smaller encoding of ``out``, a tensor this quantizer just produced, or None.

        Autograd saves a quantized layer's quantized input for the weight gradient; storing it as integer
        codes instead of floats saves memory. :meth:`expand` must reproduce ``out`` bit for bit. Methods
        whose outputs are not ``code * scale (+ offset)`` keep the default (no compaction).
        """
        return None

    def expand(self, packed: Any) -> torch.Tensor:
        """Inverse of :meth:`compact`."""
        raise NotImplementedError(f"{type(self).__name__} does not compact its outputs")

    # ----------------------------------------------------------------------------------- initialisation

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` if an unsigned quantizer is fed negative values (it would clip them to 0).

        Runs on the first batch each process feeds through the quantizer (one ``min`` reduction).
        """
        if self.enabled and not self.signed and x.numel() and bool((x < 0).any()):
            raise ValueError(
                f"{self.method} quantizer{self._where()} is unsigned but its input has negative values "
                f"(min {float(x.detach().min()):.4g}); an unsigned grid would clip them to 0. Quantize it as signed "
                f"(activation signed: true for this module), or make the input non-negative (e.g. BN + ReLU)"
            )

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Fold one batch into the data-driven initial values (all-reduced over ranks).

        With ``init_batches = n`` the values are the running mean of the per-batch estimates over the first
        n batches; afterwards ``initialized`` is set and the state is only changed by training.
        """
        if not self.data_driven:
            return
        seen = int(self.init_batches_seen)
        for name, estimate in self._initial_values(x.detach()).items():
            estimate = all_reduce_mean(estimate.to(torch.float32).clone())
            target = getattr(self, name)
            estimate = estimate.to(target.dtype).reshape(target.shape)
            target.data.copy_(estimate if seen == 0 else target.data + (estimate - target.data) / (seen + 1))
        self.init_batches_seen.fill_(seen + 1)
        if seen + 1 >= getattr(self, "init_batches", 1):
            self.initialized.fill_(True)

    def reset_initialization(self) -> None:
        """Forget data-driven state so that the next batches initialise it again."""
        if self.data_driven and self.enabled:
            self.initialized.fill_(False)
            self.init_batches_seen.zero_()
            self._known_initialized = False

    def _initial_values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-batch estimates of the data-driven state: {attribute name: value}."""
        return {}

    # ----------------------------------------------------------------------------------- helpers

    def _per_channel_axis(self, x: torch.Tensor) -> int | None:
        """The channel axis of ``x`` for per-channel state, ``None`` for per-tensor."""
        if self.granularity != "per_channel":
            return None
        if x.shape[self.channel_axis] != self.num_channels:
            raise ValueError(
                f"{self.method} quantizer{self._where()} was built for {self.num_channels} channels on axis "
                f"{self.channel_axis}, got a tensor of shape {tuple(x.shape)}"
            )
        return self.channel_axis

    def _state_shape(self) -> tuple[int, ...]:
        return (self.num_channels,) if self.granularity == "per_channel" else ()

    def _reduce_dims(self, x: torch.Tensor) -> list[int]:
        """Dimensions to reduce for per-tensor/per-channel statistics."""
        axis = self._per_channel_axis(x)
        return [d for d in range(x.dim()) if d != axis]

    def _mean_abs(self, x: torch.Tensor) -> torch.Tensor:
        """mean(|x|) over the whole tensor or per channel (shape of the per-channel state)."""
        dims = self._reduce_dims(x)
        # An empty dim list would mean "reduce everything" to torch; here it means "nothing to reduce".
        return x.abs().mean(dim=dims) if dims else x.abs()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        own = [prefix + name for name, _ in self.named_parameters(recurse=False)]
        own += [prefix + name for name, _ in self.named_buffers(recurse=False)]
        if own and not any(key in state_dict for key in own):
            # A float checkpoint (no quantizer state at all): keep the current state, initialise from data.
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self._known_initialized = False  # re-read the loaded flag on next use

    def repr_options(self) -> dict[str, Any]:
        """Method-specific settings shown by ``repr`` (subclasses extend)."""
        return {}

    def extra_repr(self) -> str:
        if not self.enabled:
            return "bits=off"
        parts = [f"bits={self.bits_label}", f"signed={self.signed}", self.granularity]
        if self.role == "weight":
            parts.append("role=weight")
        if self.granularity == "per_channel":
            parts.append(f"channels={self.num_channels}@{self.channel_axis}")
        parts += [f"{key}={value}" for key, value in self.repr_options().items()]
        return ", ".join(parts)
