"""The quantizer contract shared by every method, its integer grid, and the registry of methods.

Contract for a class registered in :data:`QUANTIZERS` (checked by ``tests/unit/test_registry.py`` for
every registered name):

* It subclasses :class:`Quantizer`, declares its options as a :class:`~.recipe.QuantizerOptions` dataclass
  (``Options``) and is built from a :class:`~.recipe.QuantizerRecipe`, a role and the channel layout of
  what it quantizes, by :func:`build_quantizer` (the one builder). Registering it under a name sets its
  :attr:`Quantizer.method`. ``bits=None`` means "off": the quantizer is the identity and holds no state.
* ``forward(x)`` returns a tensor of the same shape and dtype on the grid the recipe describes (at most
  ``2**bits`` distinct values per tensor or per channel; exactly 3 for ternary).
* :meth:`Quantizer.integer_grid` states that grid as integers and a scale (:class:`IntegerGrid`), or
  raises :class:`GridUnavailable` saying why (LQ-Net's non-uniform levels). Export, the compact saved
  activations and reports read that, never a quantizer's private attributes.
* Every piece of state (learned step sizes, observed ranges, "initialised" flags) is a parameter or a
  persistent buffer, so ``state_dict()``/``load_state_dict()`` reproduce outputs exactly and a loaded
  checkpoint is never re-initialised from data. A state dict holding *none* of a quantizer's keys (a
  float checkpoint loaded into a converted model) leaves its state untouched, so data-driven
  initialisation still happens.
* Every enabled quantizer records the grid its state belongs to (:attr:`Quantizer.grid_label`) under
  :data:`RECIPE_KEY` in state dicts (a fixed-size ``uint8`` entry, not a buffer: never moved, cast or
  broadcast). Loading state recorded for another grid is an error naming the quantizer; state without a
  record (written before grids were recorded) loads unchecked.
* Data-driven initial values are averaged over DDP ranks (:mod:`model_quantization.distributed`).
* Non-finite state is never stored: a batch with NaN/Inf (or whose estimate overflows float32) is refused
  with a ``ValueError`` naming the module, and so is a checkpoint holding non-finite quantizer state. An
  all-zero batch carries no scale: it is skipped (initialisation waits for data) with one warning. Steps
  (and PACT's clip) are clamped to at least ``MIN_STEP`` inside the fake-quant functions, so a learned step
  pushed below zero by SGD never flips or divides by zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from model_quantization.distributed import all_reduce_max, all_reduce_mean
from model_quantization.functional import MIN_STEP
from model_quantization.quantizers.recipe import (
    GRANULARITIES,
    MAX_BITS,
    QUANTIZERS,
    ROLES,
    QuantizerOptions,
    QuantizerRecipe,
)

__all__ = [
    "GRANULARITIES",
    "MAX_BITS",
    "MIN_STEP",
    "QUANTIZERS",
    "RECIPE_BYTES",
    "RECIPE_KEY",
    "ROLES",
    "GridUnavailable",
    "IntegerGrid",
    "Quantizer",
    "build_quantizer",
    "calibration",
    "decode_grid",
    "encode_grid",
    "grid_mismatches",
]


logger = logging.getLogger(__name__)

#: State-dict entry, under each enabled quantizer's prefix, that records the grid its state belongs to
#: (:attr:`Quantizer.grid_label`), so that a checkpoint is never loaded into a model with another grid.
#: UTF-8, zero padded to a fixed length: detectron2's checkpointer drops entries whose shape differs from
#: the model's before loading, so a variable length would hide exactly the mismatches this is for.
RECIPE_KEY = "recipe"
RECIPE_BYTES = 64


def encode_grid(label: str) -> torch.Tensor:
    """``label`` as a ``uint8`` tensor of :data:`RECIPE_BYTES` bytes (a :data:`RECIPE_KEY` entry)."""
    data = label.encode()
    if len(data) > RECIPE_BYTES:
        raise ValueError(f"grid label {label!r} is longer than {RECIPE_BYTES} bytes")
    return torch.tensor(list(data.ljust(RECIPE_BYTES, b"\0")), dtype=torch.uint8)


def decode_grid(value: Any) -> str:
    """The label a :data:`RECIPE_KEY` entry holds (``"unreadable"`` when it is not one)."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        return "unreadable"
    try:
        return bytes(value.tolist()).rstrip(b"\0").decode()
    except UnicodeDecodeError:
        return "unreadable"


class GridUnavailable(ValueError):
    """A quantizer cannot state its output as integers times a scale (and says why)."""


@dataclass(frozen=True)
class IntegerGrid:
    """A quantizer's output as integers: ``out == (codes - zero_point) * scale`` with integer ``codes``.

    Attributes:
        scale: positive step, shape ``()`` (per tensor) or ``(C,)`` (one per channel along ``axis``).
        zero_point: the integer code of 0.0 (0 for every method here: signed grids are symmetric and
            unsigned ones start at 0).
        qmin, qmax: the integer range of the codes (a method may use a subset, e.g. DoReFa's odd codes).
        axis: the channel axis of the quantized tensor that ``scale`` indexes; None per tensor.
        rounding: ``"nearest"``, codes are ``clamp(round(x / scale) + zero_point, qmin, qmax)``
            (round half to even); ``"sign"``, codes are ``qmax`` for ``x >= 0`` and ``qmin`` otherwise
            (binary grids have no zero level).
    """

    scale: torch.Tensor
    qmin: int
    qmax: int
    zero_point: int = 0
    axis: int | None = None
    rounding: str = "nearest"

    def broadcast_scale(self, ndim: int) -> torch.Tensor:
        """``scale`` shaped to broadcast against a tensor of ``ndim`` dimensions."""
        if self.axis is None:
            return self.scale.reshape(())
        shape = [1] * ndim
        shape[self.axis] = -1
        return self.scale.reshape(shape)

    def codes(self, out: torch.Tensor) -> torch.Tensor:
        """The integer codes (as a float tensor) of ``out``, a tensor on this grid."""
        return torch.round(out / self.broadcast_scale(out.dim()).to(out.dtype)) + self.zero_point

    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(codes - zero_point) * scale`` in ``dtype``."""
        values = codes.to(dtype) - self.zero_point if self.zero_point else codes.to(dtype)
        return values * self.broadcast_scale(codes.dim()).to(dtype)

    @property
    def container(self) -> torch.dtype:
        """The smallest 8-bit integer type that holds every code (uint8 when no code is negative)."""
        return torch.uint8 if self.qmin >= 0 else torch.int8


class Quantizer(nn.Module):
    """Base class: bit width, signedness, granularity, role, the grid and data-driven initialisation.

    Built by :func:`build_quantizer` from a recipe; subclasses create their state in
    :meth:`_create_state` (called only when the quantizer is on) and implement :meth:`quantize`.

    Args:
        recipe: method, bits (``None`` = off), signedness, granularity and options; validated here.
        role: ``"weight"`` or ``"activation"``; some methods treat them differently (DoReFa, binary).
        channel_axis: the output-channel axis of the weight (0 for Conv2d/Linear, 1 for ConvTranspose2d).
        num_channels: size of that axis; required for per-channel state.

    Subclasses set :attr:`Options`, :attr:`roles` and :attr:`signedness` (allowed combinations), and, when
    they have data-driven state, :attr:`data_driven` plus :meth:`_initial_values`.
    """

    #: Registry name, set when the class is registered in :data:`QUANTIZERS`.
    method: ClassVar[str] = ""
    #: The method's options (defaults, types, checks).
    Options: ClassVar[type[QuantizerOptions]] = QuantizerOptions
    #: Roles this method supports.
    roles: ClassVar[tuple[str, ...]] = ROLES
    #: role -> allowed values of ``signed``.
    signedness: ClassVar[dict[str, tuple[bool, ...]]] = {"weight": (True,), "activation": (True, False)}
    #: Allowed bit widths (besides ``None``).
    bit_range: ClassVar[tuple[int, int]] = (1, MAX_BITS)
    #: Whether the method has state estimated from the first batch(es).
    data_driven: ClassVar[bool] = False
    #: While True (see :func:`calibration`), every batch folds into the data-driven state, whatever
    #: ``init_batches`` says, and sets ``initialized``; afterwards the state is frozen (only training changes
    #: learned parameters). A per-instance switch, not state: never saved.
    calibrating: bool = False
    #: Whether the forward pass computes exactly ``codes * scale`` in the input's dtype, so that the
    #: saved quantized input can be stored as codes (:meth:`compact`) and rebuilt bit for bit.
    exact_codes: ClassVar[bool] = False

    def __init__(
        self,
        recipe: QuantizerRecipe,
        role: str = "activation",
        *,
        channel_axis: int = 0,
        num_channels: int | None = None,
    ) -> None:
        super().__init__()
        if recipe.method != self.method:
            raise ValueError(f"{type(self).__name__} implements {self.method!r}, not {recipe.method!r}")
        self.options = recipe.validate(role)
        if recipe.granularity == "per_channel" and recipe.bits is not None and not num_channels:
            raise ValueError(f"{self.method}: per_channel quantization needs num_channels")
        self.recipe = recipe
        self.role = role
        self.channel_axis = channel_axis
        self.num_channels = num_channels if recipe.granularity == "per_channel" else None
        #: Qualified name of the owning module, set by ``convert`` so errors can say where they happened.
        self.owner: str = ""
        # Per process, not state: the signedness check runs on the first batch this process sees.
        self._input_checked = False
        self._known_initialized = False
        # Per process, for messages only: all-zero batches skipped so far, and whether that was warned.
        self._deferred_batches = 0
        self._warned_degenerate = False
        if self.enabled:
            if self.data_driven:
                self.register_buffer("initialized", torch.tensor(False))
                self.register_buffer("init_batches_seen", torch.tensor(0, dtype=torch.long))
            self._create_state()

    def _create_state(self) -> None:
        """Create parameters and buffers (hook for subclasses; only called when the quantizer is on)."""

    # ----------------------------------------------------------------------------------- properties

    @property
    def bits(self) -> int | None:
        return self.recipe.bits

    @property
    def signed(self) -> bool:
        return self.recipe.signed

    @property
    def granularity(self) -> str:
        return self.recipe.granularity

    @property
    def enabled(self) -> bool:
        """False when ``bits`` is off: the quantizer is the identity."""
        return self.recipe.bits is not None

    @property
    def bits_label(self) -> str:
        """Human-readable bit width for reports ("4", "ter", "off")."""
        return "off" if self.bits is None else str(self.bits)

    @property
    def grid_label(self) -> str:
        """What a checkpoint records of this quantizer: method, bits, signedness, granularity
        (``"lsq 4-bit unsigned per_tensor"``, ``"lqnet ternary signed per_tensor"``), or ``"off"``."""
        if not self.enabled:
            return "off"
        bits = "ternary" if self.bits_label == "ter" else f"{self.bits}-bit"
        return f"{self.method} {bits} {'signed' if self.signed else 'unsigned'} {self.granularity}"

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
        if self.calibrating or not self.is_initialized:
            if not (self.training or self.calibrating):
                raise RuntimeError(self._uninitialized_message())
            self.initialize(x)
        return self.quantize(x)

    def _uninitialized_message(self) -> str:
        """Why an uninitialised quantizer refuses to evaluate, and what to do instead."""
        seen = int(self.init_batches_seen)
        if self._deferred_batches:
            why = f" (every batch it saw, {self._deferred_batches}, was all zeros)"
        elif seen:
            why = f" ({seen} of its {self.init_batches} initialisation batches seen)"
        else:
            why = " (a float checkpoint, or a model that never trained)"
        return (
            f"{self.method} quantizer{self._where()} was never initialised from data{why}, and the model is "
            f"in eval mode: evaluating now would estimate its state from the first evaluation batch. Train "
            f"the quantized model first, or calibrate it (with model_quantization.calibration(model): run a "
            f"few batches), or load a checkpoint of a trained quantized model"
        )

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the current state (subclasses implement)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- the grid

    def integer_grid(self, x: torch.Tensor | None = None) -> IntegerGrid:
        """The integer grid of this quantizer's output, or :class:`GridUnavailable` saying why not.

        Args:
            x: the tensor being quantized, for methods whose scale is computed from it (DoReFa and XNOR
                weights); activation grids depend on the quantizer's state only.
        """
        raise GridUnavailable(f"{self.method} quantizer{self._where()} does not state an integer grid")

    def _check_grid_ready(self) -> None:
        """:class:`GridUnavailable` when the quantizer is off or its data-driven state was never set."""
        if not self.enabled:
            raise GridUnavailable(f"{self.method} quantizer{self._where()} is off (no grid)")
        if not self.is_initialized:
            raise GridUnavailable(
                f"{self.method} quantizer{self._where()} was never initialised from data: train or "
                f"calibrate the model first"
            )

    def compact(self, out: torch.Tensor) -> Any | None:
        """An exact, smaller encoding of ``out``, a tensor this quantizer just produced, or None.

        Autograd saves a quantized layer's quantized input for the weight gradient; storing it as 8-bit
        integer codes of :meth:`integer_grid` instead of floats saves memory. :meth:`expand` reproduces
        ``out`` bit for bit.
        """
        if not self.exact_codes or self.granularity != "per_tensor":
            return None
        try:
            grid = self.integer_grid()
        except GridUnavailable:
            return None
        if grid.qmin < -128 or grid.qmax > (255 if grid.qmin >= 0 else 127):
            return None
        return grid.codes(out).to(grid.container), grid, out.dtype

    def expand(self, packed: Any) -> torch.Tensor:
        """Inverse of :meth:`compact`."""
        codes, grid, dtype = packed
        # The same float operations as the forward pass (q * s), hence the same bits.
        return grid.dequantize(codes, dtype)

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

    @property
    def init_batches(self) -> int:
        """Batches whose estimates are averaged into the initial state (1 unless the options say more)."""
        return getattr(self.options, "init_batches", 1)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Fold one batch into the data-driven initial values (all-reduced over ranks).

        With ``init_batches = n`` the values are the running mean of the per-batch estimates over the first
        n batches; afterwards ``initialized`` is set and the state is only changed by training. While
        :attr:`calibrating`, every batch is folded into that running mean and ``initialized`` is set.

        A batch with NaN/Inf is refused (``ValueError``, nothing stored). A degenerate batch (all zeros: a
        dead input carries no scale) is not counted: initialisation is deferred to the next batch that has
        data, with one warning naming the quantizer. Per-channel state whose channels are only partly
        dead starts those channels from the mean of the live ones, with a warning naming them.
        """
        if not self.data_driven:
            return
        x = x.detach()
        self.refuse_non_finite_input(x)
        seen = int(self.init_batches_seen)
        estimates = {}
        for name, estimate in self._initial_values(x).items():
            estimates[name] = all_reduce_mean(estimate.to(torch.float32).clone())
        self.refuse_non_finite_estimates(estimates, x)
        dead = self._degenerate(estimates)
        if dead is not None and bool(dead.any()):
            if bool(dead.all()):
                self._defer(seen)
                return
            estimates = self._fill_dead_groups(estimates, dead)
        for name, estimate in estimates.items():
            target = getattr(self, name)
            estimate = estimate.to(target.dtype).reshape(target.shape)
            target.data.copy_(estimate if seen == 0 else target.data + (estimate - target.data) / (seen + 1))
        self.init_batches_seen.fill_(seen + 1)
        if self.calibrating or seen + 1 >= self.init_batches:
            self.initialized.fill_(True)
            self._known_initialized = True

    def _degenerate(self, estimates: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Which groups (the tensor, or each channel) of a batch's estimates carry no scale (all-zero data).

        A boolean tensor shaped like the per-group state (``()`` or ``(C,)``), or None when the method has
        no notion of it. Decided on the all-reduced estimates, so every DDP rank decides alike.
        """
        return None

    def _defer(self, seen: int) -> None:
        """Skip a degenerate batch: nothing is stored or counted; warn once per quantizer."""
        self._deferred_batches += 1
        if not self._warned_degenerate:
            self._warned_degenerate = True
            logger.warning(
                "%s quantizer%s: its input was all zeros (no scale to estimate); initialisation deferred to the "
                "next batch with non-zero values (%d of %d initialisation batches done)",
                self.method, self._where(), seen, self.init_batches,
            )  # fmt: skip

    def _fill_dead_groups(
        self, estimates: dict[str, torch.Tensor], dead: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Estimates with the dead channels set to the mean of the live channels' estimates (warned once)."""
        if not self._warned_degenerate:
            self._warned_degenerate = True
            channels = dead.reshape(-1).nonzero().flatten().tolist()
            logger.warning(
                "%s quantizer%s: channels %s were all zeros in its initialisation batch; they start from the "
                "mean of the other channels' estimates",
                self.method, self._where(), channels,
            )  # fmt: skip
        filled = {}
        for name, value in estimates.items():
            mask = dead.reshape(dead.shape + (1,) * (value.dim() - dead.dim()))
            filled[name] = torch.where(mask, value[~dead.reshape(-1)].mean(dim=0), value)
        return filled

    def refuse_non_finite_input(self, x: torch.Tensor) -> None:
        """``ValueError`` naming this quantizer if the batch that would initialise it holds NaN or Inf.

        Collective under DDP (a flag is max-reduced), so every rank refuses together instead of one rank
        raising while the others wait in the next all-reduce. Runs on initialisation batches only.
        """
        bad = all_reduce_max((~torch.isfinite(x)).any().to(torch.float32).reshape(1))
        if not bool(bad):
            return
        nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        found = f"{nan} nan and {inf} inf of {x.numel()} values" if nan or inf else "nan/inf on another rank"
        raise ValueError(
            f"{self.method} quantizer{self._where()}: the batch that would initialise it holds non-finite "
            f"values ({found}); its state was not set. Find where they come from (the data, a diverged "
            f"layer upstream, loss scaling); a finite batch initialises it"
        )

    def refuse_non_finite_estimates(self, estimates: dict[str, torch.Tensor], x: torch.Tensor) -> None:
        """``ValueError`` naming this quantizer if a data-driven estimate of a finite batch is not finite
        (float32 overflow, e.g. inputs near 3e38); nothing is stored."""
        for name, value in estimates.items():
            if not bool(torch.isfinite(value).all()):
                peak = float(x.abs().max()) if x.numel() else 0.0
                raise ValueError(
                    f"{self.method} quantizer{self._where()}: its initial {name} overflows float32 "
                    f"(non-finite estimate from inputs up to |x| = {peak:.3g}); its state was not set. "
                    f"Scale the input down, or keep this module in float"
                )

    def _load_non_finite(self, state_dict, prefix: str) -> str | None:
        """The first non-finite floating entry of this quantizer's own state in ``state_dict``, or None."""
        own = [name for name, _ in self.named_parameters(recurse=False)]
        own += [name for name, _ in self.named_buffers(recurse=False)]
        for name in own:
            value = state_dict.get(prefix + name)
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and not bool(torch.isfinite(value).all())
            ):
                flat = value.flatten()
                return f"{prefix}{name} = {flat[~torch.isfinite(flat)][0].item()}"
        return None

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

    def _state_axis(self) -> int | None:
        """The channel axis the state indexes (None per tensor), for :class:`IntegerGrid`."""
        return self.channel_axis if self.granularity == "per_channel" else None

    def _reduce_dims(self, x: torch.Tensor) -> list[int]:
        """Dimensions to reduce for per-tensor/per-channel statistics."""
        axis = self._per_channel_axis(x)
        return [d for d in range(x.dim()) if d != axis]

    def _mean_abs(self, x: torch.Tensor) -> torch.Tensor:
        """mean(|x|) over the whole tensor or per channel (shape of the per-channel state)."""
        dims = self._reduce_dims(x)
        # An empty dim list would mean "reduce everything" to torch; here it means "nothing to reduce".
        return x.abs().mean(dim=dims) if dims else x.abs()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.enabled:  # "off" holds no state and records nothing
            destination[prefix + RECIPE_KEY] = encode_grid(self.grid_label)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        recorded = state_dict.get(prefix + RECIPE_KEY)
        if recorded is not None and decode_grid(recorded) != self.grid_label:
            # Loading it would run this grid with state learned for another (e.g. 4-bit steps at 2 bits).
            errors.append(
                f"quantizer {prefix[:-1]!r}{self._where()}: the checkpoint's grid is "
                f"{decode_grid(recorded)!r}, this model's is {self.grid_label!r}; nothing of it was loaded"
            )
            return
        # Checkpoints written before grids were recorded have no entry: they load without a check.
        own = [prefix + name for name, _ in self.named_parameters(recurse=False)]
        own += [prefix + name for name, _ in self.named_buffers(recurse=False)]
        if own and not any(key in state_dict for key in own):
            # A float checkpoint (no quantizer state at all): keep the current state, initialise from data.
            return
        bad = self._load_non_finite(state_dict, prefix)
        if bad is not None:
            # Never store it: a poisoned state would make every later output non-finite.
            errors.append(
                f"{self.method} quantizer {prefix[:-1]!r}{self._where()}: the checkpoint holds non-finite "
                f"quantizer state ({bad}); it was saved after a bad initialisation or a diverged run. Load an "
                f"earlier checkpoint, or drop this quantizer's state so that it initialises from data"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if prefix + RECIPE_KEY in unexpected:  # ours, checked above; not a parameter or buffer
            unexpected.remove(prefix + RECIPE_KEY)
        self._known_initialized = False  # re-read the loaded flag on next use

    def extra_repr(self) -> str:
        if not self.enabled:
            return "bits=off"
        calibrating = ["calibrating=True"] if self.calibrating else []
        parts = [f"bits={self.bits_label}", f"signed={self.signed}", self.granularity]
        if self.role == "weight":
            parts.append("role=weight")
        if self.granularity == "per_channel":
            parts.append(f"channels={self.num_channels}@{self.channel_axis}")
        defaults = type(self.options)()
        parts += [
            f"{f.name}={getattr(self.options, f.name)}"
            for f in dataclasses.fields(self.options)
            if getattr(self.options, f.name) != getattr(defaults, f.name)
        ]
        return ", ".join(parts + calibrating)


@contextlib.contextmanager
def calibration(model: nn.Module, *, reset: bool = False) -> Iterator[list[Quantizer]]:
    """Switch :attr:`Quantizer.calibrating` on for every enabled quantizer in ``model`` inside the block.

    In there every forward pass folds its batch into each quantizer's data-driven state: LSQ's step is the
    running mean of the per-batch estimates (its ``init_method``), PACT's clip and LQ-Net's basis the mean
    of their per-batch initial estimates, observers update their ranges. Each quantizer that saw a batch
    is initialised; after the block the state is frozen (training still learns LSQ steps and PACT clips).
    Works in train or eval mode and does not change it; evaluation of a model with quantizers that were
    never initialised is an error outside this block. Under DDP every rank must run the same number of
    batches (the estimates are all-reduced).

    Args:
        model: any module (a quantizer itself included).
        reset: forget the stored data-driven state first (otherwise the batches extend the running mean
            or range that is there).

    Yields the quantizers it switched on.
    """
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer) and m.enabled]
    previous = [m.calibrating for m in quantizers]
    if reset:
        for m in quantizers:
            m.reset_initialization()
    for m in quantizers:
        m.calibrating = True
    try:
        yield quantizers
    finally:
        for m, flag in zip(quantizers, previous, strict=True):
            m.calibrating = flag


def grid_mismatches(
    model: nn.Module, state_dict: Mapping[str, Any], prefix: str = ""
) -> list[tuple[str, str, str]]:
    """``(quantizer name, checkpoint's grid, model's grid)`` for every grid recorded in ``state_dict`` (keys
    under ``prefix``) that differs from the model's; the model's grid is ``"float"`` where it has no
    quantizer of that name. Checkpoints without records (float ones, or written before grids were
    recorded) have no mismatches."""
    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}
    suffix = "." + RECIPE_KEY
    mismatches = []
    for key, value in state_dict.items():
        if not (key.startswith(prefix) and key.endswith(suffix)):
            continue
        name = key[len(prefix) : -len(suffix)]
        quantizer = quantizers.get(name)
        expected = quantizer.grid_label if quantizer is not None else "float"
        if decode_grid(value) != expected:
            mismatches.append((name, decode_grid(value), expected))
    return mismatches


def build_quantizer(
    recipe: QuantizerRecipe,
    role: str = "activation",
    *,
    channel_axis: int = 0,
    num_channels: int | None = None,
    owner: str = "",
) -> Quantizer:
    """Build the quantizer ``recipe`` describes for ``role`` (the one way to build a quantizer).

    Args:
        recipe: method (a name in :data:`QUANTIZERS`), bits, signedness, granularity, options.
        role: ``"weight"`` or ``"activation"``.
        channel_axis, num_channels: where the output channels of a weight are, for per-channel recipes.
        owner: qualified name of the module it belongs to, used in error messages.

    Raises:
        ValueError: naming the setting, for an unknown method or an invalid recipe.
    """
    cls = recipe.quantizer_class
    quantizer = cls(recipe, role, channel_axis=channel_axis, num_channels=num_channels)
    quantizer.owner = owner
    return quantizer
