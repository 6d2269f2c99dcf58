"""LQ-Nets: learned quantization with a per-group basis (Zhang et al., ECCV 2018)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from model_quantization import functional as F
from model_quantization.distributed import all_reduce_mean
from model_quantization.quantizers.base import QUANTIZERS, GridUnavailable, IntegerGrid, Quantizer
from model_quantization.quantizers.recipe import DataDrivenOptions, QuantizerRecipe


def code_matrix(bits: int, signed: bool, ternary: bool = False) -> torch.Tensor:
    """The L x K' matrix of binary codes whose products with a basis give the quantization levels.

    K-bit: every code in {-1, +1}^K (signed) or {0, 1}^K (unsigned), L = 2^K. Ternary ties a 2-bit basis
    (v1 = v2 = v), so the code sums {-2, 0, 2} (signed) or {0, 1, 2} (unsigned) times v give exactly three
    levels; it is represented directly as one basis element with those three coefficients.
    """
    if ternary:
        return torch.tensor([[-2.0], [0.0], [2.0]] if signed else [[0.0], [1.0], [2.0]])
    values = (-1.0, 1.0) if signed else (0.0, 1.0)
    return torch.tensor(list(itertools.product(values, repeat=bits)))


@dataclass(frozen=True)
class LQNetOptions(DataDrivenOptions):
    """Options of :class:`LQNetQuantizer`.

    Attributes:
        momentum: EMA weight of the old basis.
        ternary: three levels {-2v, 0, 2v} (signed) or {0, v, 2v} (unsigned); requires ``bits=2``.
        init_batches: batches whose fitted bases are averaged into the initial basis. Each initial fit
            starts from a uniform grid scaled by mean(|x|) and runs a few QEM iterations.
    """

    momentum: float = 0.9
    ternary: bool = False

    def check(self, recipe: QuantizerRecipe, role: str) -> None:
        super().check(recipe, role)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum!r}")
        if self.ternary and recipe.bits != 2:
            raise ValueError(f"ternary: needs bits=2 (a tied 2-bit basis), got bits={recipe.bits!r}")


@QUANTIZERS.register("lqnet")
class LQNetQuantizer(Quantizer):
    """Levels ``v^T b`` for binary codes ``b`` and a basis ``v`` fitted to the data by least squares.

    Every value is mapped to its nearest level. In training, each forward pass refits the basis of every
    group (the whole tensor, or one output channel for per-channel weights) to the codes it just assigned,
    ``v* = argmin_v ||B v - x||^2`` (the paper's QEM step, solved with a pseudo-inverse so that unused codes
    do not break it), and moves the stored basis towards it: ``v <- momentum * v + (1 - momentum) * v*``
    (not while :attr:`calibrating`: the basis is then the mean of the per-batch initial fits).
    The basis is a buffer, not trained by gradients; the input gets the straight-through gradient.
    Options: :class:`LQNetOptions`.
    """

    Options = LQNetOptions
    data_driven = True
    init_iterations = 5

    def _create_state(self) -> None:
        codes = code_matrix(self.bits, self.signed, self.options.ternary)
        self.register_buffer("codes", codes, persistent=False)  # a constant of the configuration
        groups = self.num_channels or 1
        self.register_buffer("basis", torch.ones(groups, codes.shape[1]))

    def integer_grid(self, x: torch.Tensor | None = None) -> IntegerGrid:
        raise GridUnavailable(
            f"lqnet quantizer{self._where()}: its levels are a learned, non-uniform basis, not integers "
            f"times one scale"
        )

    @property
    def bits_label(self) -> str:
        return "ter" if self.enabled and self.options.ternary else super().bits_label

    # --------------------------------------------------------------------------------------- core

    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        """View ``x`` as (groups, elements per group)."""
        axis = self._per_channel_axis(x)
        if axis is None:
            return x.reshape(1, -1)
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)

    def _ungroup(self, grouped: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        axis = self._per_channel_axis(like)
        if axis is None:
            return grouped.reshape(like.shape)
        moved = list(like.shape)
        moved.insert(0, moved.pop(axis))
        return grouped.reshape(moved).movedim(0, axis)

    def levels(self, basis: torch.Tensor | None = None) -> torch.Tensor:
        """Quantization levels per group, (groups, L), in code order."""
        basis = self.basis if basis is None else basis
        return basis @ self.codes.to(basis.dtype).T

    def _assign(
        self, xg: torch.Tensor, basis: torch.Tensor, statistics: bool = False
    ) -> tuple[F.NearestLevels, torch.Tensor]:
        """Nearest level of every element (with per-level statistics) and the code order of the sorted levels."""
        sorted_levels, order = self.levels(basis).sort(dim=1)
        return F.nearest_level(xg, sorted_levels, statistics=statistics), order

    def _fit_basis(self, counts: torch.Tensor, sums: torch.Tensor, order: torch.Tensor, basis: torch.Tensor):
        """Least-squares basis from the per-level counts and sums of an assignment (all-reduced), per group."""
        groups = order.shape[0]
        codes = self.codes.to(torch.float64)[order]  # (groups, L, K'): codes of the sorted levels
        btb = torch.einsum("gl,glk,glj->gkj", counts, codes, codes)
        btx = torch.einsum("gl,glk->gk", sums, codes)
        stats = all_reduce_mean(torch.cat([btb.flatten(1), btx], dim=1))
        k = codes.shape[-1]
        btb, btx = stats[:, : k * k].reshape(groups, k, k), stats[:, k * k :]
        solution = (torch.linalg.pinv(btb) @ btx.unsqueeze(-1)).squeeze(-1).to(basis.dtype)
        # A group whose values all fell on the zero level carries no information: keep its basis.
        degenerate = (solution == 0).all(dim=1, keepdim=True)
        return torch.where(degenerate, basis, solution)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        xg = self._groups(x.detach())
        update = self.training and not self.calibrating  # calibrating: the basis is the mean of the fits
        nearest, order = self._assign(xg, self.basis.to(x.dtype), statistics=update)
        if update:
            with torch.no_grad():
                fitted = self._fit_basis(nearest.counts, nearest.sums, order, self.basis)
                momentum = self.options.momentum
                self.basis.mul_(momentum).add_(fitted, alpha=1.0 - momentum)
        return F.straight_through(x, self._ungroup(nearest.values, x))

    def _degenerate(self, estimates: dict[str, torch.Tensor]) -> torch.Tensor:
        # All-zero groups keep the initial basis of mean|x| clamped to eps: entries of at most ~1.4 eps.
        return estimates["basis"].abs().amax(dim=1) <= 2 * torch.finfo(torch.float32).eps

    def _initial_values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        xg = self._groups(x).to(torch.float32)
        mean_abs = xg.abs().mean(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
        k = self.codes.shape[1]
        if self.options.ternary:
            # Signed: levels +-mean|x|; unsigned: {0, mean, 2 mean}.
            scale = mean_abs / 2 if self.signed else mean_abs
            basis = scale.expand(-1, 1)
        else:
            # Powers of two give a uniform grid: odd multiples of a (signed) or 0..(2^K - 1) a (unsigned).
            powers = 2.0 ** torch.arange(k, dtype=torch.float32, device=x.device)
            a = mean_abs / 2 ** (k - 1) if self.signed else 2 * mean_abs / (2**k - 1)
            basis = a * powers
        for _ in range(self.init_iterations):
            nearest, order = self._assign(xg, basis, statistics=True)
            basis = self._fit_basis(nearest.counts, nearest.sums, order, basis)
        return {"basis": basis}
