"""Workloads: which adapter (expert mixture) each request asks for.

The pool is every mixture of `k` of the experts with positive weights on the grid that sum to 1
(k = 1: each expert alone, at weight 1), in a seeded random order: that order is the popularity
rank. A popularity names how n requests spread over the pool (after Punica's workloads):

==============  ==========================================================================
popularity      request i asks for
==============  ==========================================================================
``distinct``    pool entry i (every request its own mixture; cycles past the pool's end)
``uniform``     an entry drawn uniformly
``zipf:α``      the entry of rank r with probability ∝ r^-α (α > 0)
``skewed``      ``zipf:1.5``
``identical``   entry 0, every time
==============  ==========================================================================

The weight grid should be a multiple of the server's (the gate's grid, 0.05 for the default
bundle), which rounds explicit mixtures to it; with a coarser grid fewer distinct mixtures exist.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from mode_cotd.errors import ConfigError

Mixture = dict[str, float]

POPULARITIES = ("distinct", "uniform", "zipf:<alpha>", "skewed", "identical")
MAX_POOL = 200_000
"""The largest pool built in memory."""


@dataclass(frozen=True)
class Popularity:
    """A parsed popularity name."""

    kind: str
    """distinct | uniform | zipf | identical."""
    alpha: float = 0.0
    """The Zipf exponent (kind zipf)."""

    @classmethod
    def parse(cls, name: str) -> Popularity:
        name = name.strip().lower()
        if name in {"distinct", "uniform", "identical"}:
            return cls(name)
        if name == "skewed":
            return cls("zipf", 1.5)
        if name.startswith("zipf:"):
            try:
                alpha = float(name.split(":", 1)[1])
            except ValueError:
                alpha = float("nan")
            if not alpha > 0 or math.isinf(alpha):
                raise ConfigError(f"zipf needs a positive exponent, e.g. zipf:1.1; got {name!r}")
            return cls("zipf", alpha)
        raise ConfigError(f"unknown popularity {name!r}; valid: {', '.join(POPULARITIES)}")


def grid_weights(k: int, grid: float) -> list[tuple[float, ...]]:
    """Every k-tuple of positive multiples of `grid` that sums to 1, in lexicographic order of units.

    k=2, grid=0.25 -> [(0.25, 0.75), (0.5, 0.5), (0.75, 0.25)].
    """
    units = round(1.0 / grid)
    if grid <= 0 or abs(units * grid - 1.0) > 1e-9:
        raise ConfigError(f"the weight grid must divide 1 (0.05, 0.1, 0.25, 0.5...), got {grid}")
    if not 1 <= k <= units:
        raise ConfigError(f"mixture arity k must be in [1, {units}] for grid {grid}, got {k}")
    # compositions of `units` into k positive parts: choose k-1 cut points among units-1
    out = []
    for cuts in itertools.combinations(range(1, units), k - 1):
        bounds = (0, *cuts, units)
        out.append(tuple(round((b - a) * grid, 10) for a, b in itertools.pairwise(bounds)))
    return out


def mixture_pool(experts: Sequence[str], k: int, grid: float, seed: int = 0) -> list[Mixture]:
    """Every mixture of k experts on the grid, in a seeded random (popularity) order."""
    if not experts:
        raise ConfigError("no experts to mix")
    if not 1 <= k <= len(experts):
        raise ConfigError(f"mixture arity k must be in [1, {len(experts)}], got {k}")
    weights = grid_weights(k, grid)
    size = math.comb(len(experts), k) * len(weights)
    if size > MAX_POOL:
        raise ConfigError(f"{size} mixtures of {k} of {len(experts)} experts on grid {grid}: more than "
                          f"{MAX_POOL}; use a smaller k or a coarser grid")
    pool = [dict(zip(names, w, strict=True))
            for names in itertools.combinations(sorted(experts), k) for w in weights]
    random.Random(seed).shuffle(pool)
    return pool


def zipf_probabilities(size: int, alpha: float) -> list[float]:
    """P(rank r) ∝ r^-alpha for r = 1..size, normalised."""
    raw = [r ** -alpha for r in range(1, size + 1)]
    total = sum(raw)
    return [p / total for p in raw]


def draw_indices(popularity: str | Popularity, pool_size: int, n: int, seed: int = 0) -> list[int]:
    """The pool entry each of n requests asks for."""
    pop = popularity if isinstance(popularity, Popularity) else Popularity.parse(popularity)
    if pool_size <= 0:
        raise ConfigError("the pool is empty")
    rng = random.Random(seed)
    if pop.kind == "distinct":
        return [i % pool_size for i in range(n)]
    if pop.kind == "identical":
        return [0] * n
    if pop.kind == "uniform":
        return [rng.randrange(pool_size) for _ in range(n)]
    return rng.choices(range(pool_size), weights=zipf_probabilities(pool_size, pop.alpha), k=n)


def draw_mixtures(popularity: str, experts: Sequence[str], k: int, grid: float, n: int,
                  seed: int = 0) -> list[Mixture]:
    """The mixture each of n requests asks for."""
    pool = mixture_pool(experts, k, grid, seed)
    return [pool[i] for i in draw_indices(popularity, len(pool), n, seed + 1)]


def mixture_key(mixture: Mixture) -> tuple[tuple[str, float], ...]:
    """A hashable, order-free key of a mixture."""
    return tuple(sorted((name, round(w, 6)) for name, w in mixture.items()))


def lru_hit_rate(keys: Sequence[Hashable], capacity: int) -> float:
    """The hit rate of an LRU cache of `capacity` entries over the request sequence (the first use is a miss)."""
    if capacity <= 0:
        raise ConfigError("capacity must be positive")
    if not keys:
        return 0.0
    cache: OrderedDict[Hashable, None] = OrderedDict()
    hits = 0
    for key in keys:
        if key in cache:
            hits += 1
            cache.move_to_end(key)
        else:
            cache[key] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits / len(keys)


class FreshMixtures:
    """Hands out pool entries no request of the run has used yet (in pool order): new composites."""

    def __init__(self, pool: Sequence[Mixture]):
        self.pool = list(pool)
        self.used: set[tuple[tuple[str, float], ...]] = set()
        self._next = 0

    def mark_used(self, mixtures: Iterable[Mixture]) -> None:
        """Remember mixtures served elsewhere (the gate's, a popularity workload's)."""
        self.used.update(mixture_key(m) for m in mixtures if m)

    def take(self, n: int) -> list[Mixture]:
        """n mixtures never handed out or marked used; ConfigError when the pool runs out."""
        out: list[Mixture] = []
        while len(out) < n:
            if self._next >= len(self.pool):
                raise ConfigError(f"the mixture pool ({len(self.pool)}) has no {n} unused mixtures left; "
                                  "use a finer grid or a larger k")
            mixture = self.pool[self._next]
            self._next += 1
            if mixture_key(mixture) not in self.used:
                self.used.add(mixture_key(mixture))
                out.append(mixture)
        return out
