"""A few-shot weight search driven step by step: ask a candidate, measure its loss, tell it back.

    minimise  loss(w) + l1 · mean_i |w_i|      (nevergrad, `budget` candidates)

The caller owns the loss (a forward pass over the shots with the experts mixed by w), so the
search can run inside an asyncio server: ``ask()`` and ``tell()`` are quick synchronous calls
and the caller awaits whatever it likes between them. training/compose.py runs the same loop
synchronously.

Two parametrizations:

- box (``simplex=False``): w ∈ [lower, upper]^n, starting from uniform 1/n clipped to the bounds;
- simplex (``simplex=True``): nevergrad searches x ∈ [0, 1]^n from uniform 1/n, and each candidate
  is projected onto the probability simplex

      w_i = max(x_i, 0) / Σ_j max(x_j, 0)        (w = 1/n everywhere when every x_j <= 0)

  so w_i >= 0 and Σ w_i = 1, the mixtures the server's fast path serves; ``lower`` and
  ``upper`` are not used. nevergrad is told the objective of the projected weights.

A search is not thread-safe: one caller alternates ask and tell. Each call silences NGOpt's
COBYLA warning about its default tolerances ("RHOEND") with ``warnings.catch_warnings``,
which changes the process-wide filters for its duration.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mode_cotd.errors import ConfigError


@dataclass
class SearchSpace:
    """What a WeightSearch searches, and how."""

    n: int
    """Number of weights (experts), >= 1."""
    lower: float
    """Lower bound of every weight (box mode only); finite, < upper."""
    upper: float
    """Upper bound of every weight (box mode only); finite, > lower."""
    budget: int
    """Candidates the search asks for (loss evaluations), >= 1."""
    optimizer: str
    """nevergrad optimizer name, a key of ng.optimizers.registry (e.g. "NGOpt")."""
    seed: int
    """Seed of the search (the parametrization's numpy RandomState): same seed, same candidates."""
    l1: float
    """L1 penalty, >= 0: objective = loss + l1 · mean_i |w_i|."""
    simplex: bool = False
    """Project every candidate onto the simplex (w >= 0, Σ w = 1); see the module docstring."""

    def validate(self) -> None:
        """ConfigError naming the first invalid field."""
        import nevergrad as ng

        if self.optimizer not in ng.optimizers.registry:
            raise ConfigError(f"weight search: unknown nevergrad optimizer {self.optimizer!r}")
        checks = {
            "n": isinstance(self.n, int) and self.n >= 1,
            "budget": isinstance(self.budget, int) and self.budget >= 1,
            "lower": math.isfinite(self.lower),
            "upper": math.isfinite(self.upper) and self.lower < self.upper,
            "l1": math.isfinite(self.l1) and self.l1 >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"weight search: {name}: invalid value {getattr(self, name)!r}")


def penalised(loss: float, weights: Sequence[float], l1: float) -> float:
    """The objective of a candidate: ``loss + l1 · mean_i |w_i|``."""
    return loss + l1 * sum(abs(w) for w in weights) / len(weights)


def project_simplex(x: Sequence[float]) -> list[float]:
    """``max(x, 0) / Σ max(x, 0)``; uniform 1/n when every entry is <= 0."""
    positive = np.maximum(np.asarray(x, dtype=np.float64), 0.0)
    total = positive.sum()
    if total <= 0:
        return [1.0 / len(positive)] * len(positive)
    return [float(w) for w in positive / total]


class WeightSearch:
    """A nevergrad search over the weights of ``space``, used as alternating ask() / tell() calls."""

    def __init__(self, space: SearchSpace):
        import nevergrad as ng  # imported here, as validate does: it takes a while to import

        space.validate()
        self.space = space
        if space.simplex:
            init, lower, upper = np.full(space.n, 1.0 / space.n), 0.0, 1.0
        else:
            init, lower, upper = np.clip(np.full(space.n, 1.0 / space.n), space.lower, space.upper), space.lower, \
                space.upper
        parametrization = ng.p.Array(init=init, lower=lower, upper=upper)
        parametrization.random_state = np.random.RandomState(space.seed)
        self._optimizer = ng.optimizers.registry[space.optimizer](parametrization=parametrization,
                                                                  budget=space.budget)
        self._pending = None  # (candidate, weights) between ask and tell
        self._history: list[dict] = []

    def ask(self) -> list[float]:
        """The next candidate's weights (projected in simplex mode); tell() its loss before asking again."""
        if self._pending is not None:
            raise RuntimeError("weight search: ask() twice; tell() the last candidate's loss first")
        if self.done:
            raise RuntimeError(f"weight search: the budget of {self.space.budget} candidates is spent")
        with _quiet():
            candidate = self._optimizer.ask()
        raw = [float(w) for w in candidate.value]
        weights = project_simplex(raw) if self.space.simplex else raw
        self._pending = (candidate, weights)
        return list(weights)

    def tell(self, weights: Sequence[float], loss: float) -> float:
        """Record the loss of the weights ask() returned; returns their objective (loss + l1 · mean |w|)."""
        if self._pending is None:
            raise RuntimeError("weight search: tell() without a pending ask()")
        candidate, asked = self._pending
        if len(weights) != len(asked) or any(float(w) != a for w, a in zip(weights, asked)):
            raise ValueError(f"weight search: told weights {list(weights)} are not the asked {asked}")
        loss = float(loss)
        objective = penalised(loss, asked, self.space.l1)
        with _quiet():
            self._optimizer.tell(candidate, objective)
        self._pending = None
        self._history.append({"weights": asked, "loss": loss, "objective": objective})
        return objective

    @property
    def done(self) -> bool:
        """Whether every candidate of the budget has been told."""
        return len(self._history) >= self.space.budget

    @property
    def history(self) -> list[dict]:
        """Every told candidate in order: {"weights", "loss", "objective"}."""
        return [dict(h, weights=list(h["weights"])) for h in self._history]

    @property
    def best(self) -> dict:
        """The told candidate with the lowest objective (the first on ties); RuntimeError before any tell."""
        if not self._history:
            raise RuntimeError("weight search: no candidate has been told yet")
        best = min(self._history, key=lambda h: h["objective"])
        return dict(best, weights=list(best["weights"]))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Ignore NGOpt's COBYLA warning about its own default tolerances for the duration."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RHOEND.*")
        yield
