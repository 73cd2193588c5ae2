"""The mixture: which experts serve a request, and the weight of each, in integer units of a grid.

    Mixture(experts=(e₁, …, e_k), units=(u₁, …, u_k), n)      weight wᵢ = uᵢ / n   (grid 1/n)

Every layer passes this one value as is: the gate produces it, routes and the serving side
(mixture union, adapter cache) consume it; floats appear only where the math needs them
(`weights`: the scalars of a composite, a union's block scales).

Canonical form, so that equal mixtures are equal values (same hash, same `digest`): experts
sorted by name (units follow), and `n` the smallest grid the weights lie on (units and n
divided by their gcd: the gate's 12/20 and 8/20 are stored as 3/5 and 2/5). Units are any
integers (negative allowed); zero units are kept when given (the gate and `from_dict` drop
them). Weights given as numbers (a bundle composition's, `Mixture(experts, weights)`) are
rounded to 10 decimals, i.e. put on the grid 1/10¹⁰ exactly as `f"{w:.10f}"` rounds them.

The mixture's id (`rank_units` / `unrank_units`): a weight vector of n units over E experts,
uᵢ ≥ 0, Σuᵢ = n, is one of C(n + E - 1, E - 1) compositions of n; its rank in colexicographic
order (stars and bars) is a dense integer id. serving.fast_lora.mixture_ids packs it, with the
union's layout, into the LoRA id vLLM passes to the LoRA ops.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import comb
from typing import Any

import torch

from mode_cotd.errors import ConfigError, ModeCotdError

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
"""Names of experts and compositions: also folder names in a bundle, and never hold ',' or '=' (the mixture's
text form is "a=0.50,b=0.50")."""
DECIMALS = 10
"""Weights given as numbers are rounded to this many decimals: the grid 1/10**DECIMALS."""


def check_name(name: Any, what: str, error: type[ModeCotdError] = ConfigError) -> str:
    """`name` when it is a safe name (NAME_PATTERN, no leading '.', no '..'); else raise `error`."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name.startswith(".") or ".." in name:
        raise error(
            f"{what} {name!r} is not a valid name (letters, digits, '_', '.', '-'; no leading '.', no '..')"
        )
    return name


# ---------------------------------------------------------------------------- the grid


def grid_units(grid: float) -> int:
    """n such that grid == 1/n; ConfigError when grid is not the reciprocal of a positive integer."""
    if isinstance(grid, bool) or not isinstance(grid, (int, float)) or not (0 < grid <= 1):
        raise ConfigError(f"grid must be a number in (0, 1], got {grid!r}")
    n = round(1 / grid)
    if abs(1 / grid - n) > 1e-6:
        raise ConfigError(f"grid must be 1/n for an integer n (e.g. 0.05, 0.1, 0.25), got {grid!r}")
    return n


def round_to_grid(weights: torch.Tensor, n: int) -> torch.Tensor:
    """Largest-remainder rounding of rows that sum to 1 into integer units of 1/n that sum to n.

    weights: [B, k] float, each row >= 0 summing to 1, columns in order of preference
    (ties in remainder go to the earlier column). Returns int64 [B, k], each row summing to n:
    each weight w gets floor(w·n) units, and the units still missing to reach n go, one each,
    to the largest remainders.
    """
    scaled = weights.to(torch.float64) * n  # [B, k]
    units = torch.floor(scaled + 1e-9)  # [B, k]
    remainder = scaled - units  # [B, k]
    deficit = (n - units.sum(1, keepdim=True)).clamp(min=0)  # [B, 1]
    order = torch.sort(remainder, dim=1, descending=True, stable=True).indices  # [B, k]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))  # [B, k]
    return (units + (rank < deficit).to(units.dtype)).long()  # [B, k]


def _is_number(w: Any) -> bool:
    return not isinstance(w, bool) and isinstance(w, (int, float)) and math.isfinite(w)


def _decimal_units(w: float) -> int:
    """w rounded to DECIMALS decimals, in units of 10**-DECIMALS (exactly as round(w, DECIMALS) rounds)."""
    return int(f"{float(w):.{DECIMALS}f}".replace(".", ""))


def _format_weight(w: float) -> str:
    """Canonical text of a weight: at least two decimals, no trailing zeros beyond ("0.70", "0.125")."""
    text = f"{w:.10f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


# ---------------------------------------------------------------------------- the mixture


@dataclass(frozen=True, init=False)
class Mixture:
    """Experts and their weights uᵢ/n; hashable, equal for equal weights (see the module docstring).

    Mixture(experts, weights)       weights as numbers, rounded to 10 decimals (grid 1/10¹⁰)
    Mixture(experts, units=, n=)    integer units of the grid 1/n
    Mixture.from_units({e: u}, n)   the same from a dict, dropping zero units (the gate's form)
    Mixture.from_dict({e: w}, grid) a request's weights, rounded to the grid
    Mixture.one(e)                  one expert at weight 1
    """

    experts: tuple[str, ...]
    """Expert names, sorted."""
    units: tuple[int, ...]
    """uᵢ: expert i's weight in units of 1/n (integers, negative allowed)."""
    n: int
    """The grid 1/n the weights lie on, the smallest such (n >= 1)."""

    def __init__(self, experts: Sequence[str], weights: Sequence[float] | None = None, *,
                 units: Sequence[int] | None = None, n: int | None = None) -> None:
        experts = tuple(experts)
        if weights is not None:
            if units is not None or n is not None:
                raise TypeError("Mixture takes weights, or units and n, not both")
            weights = tuple(weights)
        elif units is None or n is None:
            raise TypeError("Mixture needs weights, or units and n")
        count = len(weights if weights is not None else units)
        if count != len(experts) or not experts:
            raise ConfigError("a mixture needs at least one expert and exactly one weight per expert")
        if len(set(experts)) != len(experts):
            raise ConfigError(f"mixture names an expert twice: {list(experts)}")
        for i, name in enumerate(experts):
            check_name(name, "mixture expert")
            if weights is not None and not _is_number(weights[i]):
                raise ConfigError(f"mixture weight for {name!r} must be a finite number, got {weights[i]!r}")
        if weights is not None:
            units, n = tuple(_decimal_units(w) for w in weights), 10**DECIMALS
        units = tuple(units)
        if any(isinstance(u, bool) or not isinstance(u, int) for u in units):
            raise ConfigError(f"mixture units must be integers, got {list(units)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"a mixture's grid must be 1/n for an integer n >= 1, got n={n!r}")
        common = math.gcd(n, *units)
        pairs = sorted(zip(experts, (u // common for u in units)))
        object.__setattr__(self, "experts", tuple(e for e, _ in pairs))
        object.__setattr__(self, "units", tuple(u for _, u in pairs))
        object.__setattr__(self, "n", n // common)

    # ------------------------------------------------------------------------ views

    @property
    def weights(self) -> tuple[float, ...]:
        """wᵢ = uᵢ / n as floats (correctly rounded), in the order of `experts`."""
        return tuple(u / self.n for u in self.units)

    def as_dict(self) -> dict[str, float]:
        """Expert name -> weight."""
        return dict(zip(self.experts, self.weights))

    @property
    def sole_expert(self) -> str | None:
        """The expert's name when this is one expert at weight 1, else None."""
        return self.experts[0] if len(self.experts) == 1 and self.units[0] == self.n else None

    def __str__(self) -> str:
        """"a=0.50,b=0.50": each weight with at least two decimals, at most ten."""
        return ",".join(f"{e}={_format_weight(w)}" for e, w in zip(self.experts, self.weights))

    @property
    def digest(self) -> str:
        """First 16 hex digits of sha256(str(self)): a short stable id, e.g. for adapter folder names."""
        return hashlib.sha256(str(self).encode("utf-8")).hexdigest()[:16]

    def units_on(self, names: Sequence[str], n: int) -> tuple[int, ...] | None:
        """The units of this mixture over `names` (in that order; 0 for names it does not use) on the grid 1/n,
        or None when it uses an expert not in `names` or a weight is not a multiple of 1/n."""
        if not set(self.experts) <= set(names):
            return None
        mine = dict(zip(self.experts, self.units))
        scaled = [mine.get(name, 0) * n for name in names]
        if any(s % self.n for s in scaled):
            return None
        return tuple(s // self.n for s in scaled)

    # ------------------------------------------------------------------------ constructors

    @classmethod
    def one(cls, expert: str) -> Mixture:
        """One expert at weight 1."""
        return cls((expert,), units=(1,), n=1)

    @classmethod
    def from_units(cls, units: Mapping[str, int], n: int) -> Mixture:
        """A mixture from integer grid units (weight = units / n), dropping experts with 0 units."""
        kept = {name: u for name, u in units.items() if u != 0}
        return cls(tuple(kept), units=tuple(kept.values()), n=n)

    @classmethod
    def from_dict(
        cls,
        weights: Any,
        grid: float,
        known_experts: Sequence[str] | None = None,
        normalise: bool = True,
    ) -> Mixture:
        """A mixture from {expert: weight}, e.g. an explicit mixture in a request.

        normalise=True: weights must be >= 0 with a positive sum; they are divided by the sum
        and rounded to the grid like the gate's (round_to_grid: largest remainder, sum exactly 1).
        normalise=False: each weight (negative allowed) is rounded to the nearest grid multiple
        (half to even). Zero weights are dropped. ConfigError names the offending entry: an
        expert not in `known_experts`, a non-numeric, NaN or infinite weight, or nothing left.
        """
        n = grid_units(grid)
        if not isinstance(weights, dict) or not weights:
            raise ConfigError(f"mixture must be a non-empty object {{expert: weight}}, got {weights!r}")
        for name, w in weights.items():
            check_name(name, "mixture expert")
            if known_experts is not None and name not in known_experts:
                raise ConfigError(
                    f"mixture names unknown expert {name!r}; known: {', '.join(sorted(known_experts))}"
                )
            if not _is_number(w):
                raise ConfigError(f"mixture weight for {name!r} must be a finite number, got {w!r}")
        names = sorted(weights)
        values = torch.tensor([float(weights[k]) for k in names], dtype=torch.float64)  # [k]
        if normalise:
            if (values < 0).any() or values.sum() <= 0:
                raise ConfigError(
                    f"mixture weights must be >= 0 with a positive sum to normalise, got {weights!r}"
                )
            units = round_to_grid((values / values.sum())[None], n)[0]  # [k]
        else:
            units = torch.round(values * n).long()  # [k]
        if not units.any():
            raise ConfigError(f"mixture {weights!r} has no weight left after rounding to the grid {grid}")
        return cls.from_units(dict(zip(names, units.tolist())), n)


# ---------------------------------------------------------------------------- the mixture's id


def count_units(n: int, parts: int) -> int:
    """How many weight vectors of n units over `parts` experts (uᵢ ≥ 0, Σuᵢ = n) there are: C(n + parts - 1,
    parts - 1)."""
    return comb(n + parts - 1, parts - 1)


def rank_units(units: Sequence[int]) -> int:
    """Rank of a composition (u₁, …, u_E), uᵢ ≥ 0, among those of n = Σuᵢ into E parts, in 0 … count_units - 1.

    Stars and bars: bar j (j = 1..E-1) sits at position pⱼ = u₁ + … + uⱼ + j - 1 of n + E - 1;
    rank = Σⱼ C(pⱼ, j) (the combinatorial number system; colexicographic order of the bars).
    """
    rank, position = 0, -1
    for j, u in enumerate(units[:-1], start=1):
        position += u + 1
        rank += comb(position, j)
    return rank


def unrank_units(rank: int, n: int, parts: int) -> tuple[int, ...]:
    """Inverse of rank_units for n units over `parts` experts; ValueError for a rank out of range."""
    positions = []
    for j in range(parts - 1, 0, -1):  # largest bar first: the greatest p with C(p, j) <= rank
        p = j - 1
        while comb(p + 1, j) <= rank:
            p += 1
        positions.append(p)
        rank -= comb(p, j)
    positions.reverse()
    units, previous = [], -1
    for p in positions:
        units.append(p - previous - 1)
        previous = p
    units.append(n + parts - 1 - previous - 1)
    if any(u < 0 for u in units):
        raise ValueError("not a valid mixture id")
    return tuple(units)
