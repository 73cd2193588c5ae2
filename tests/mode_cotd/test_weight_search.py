"""The stepwise weight search: the same candidates as compose's former loop, the simplex mode, the protocol."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest

from mode_cotd.errors import ConfigError
from mode_cotd.weight_search import SearchSpace, WeightSearch, penalised, project_simplex
from training.compose import search_weights

TARGET = [0.6, 0.3, 0.1]


def _quadratic(weights: list[float], target: list[float] = TARGET) -> float:
    return sum((w - t) ** 2 for w, t in zip(weights, target))


def _reference_search(objective, n: int, config) -> list[dict]:
    """training/compose.py::search_weights before the move to mode_cotd.weight_search, verbatim."""
    import nevergrad as ng
    import numpy as np

    if config.optimizer not in ng.optimizers.registry:
        raise ConfigError(f"compose: unknown nevergrad optimizer {config.optimizer!r}")
    uniform = np.clip(np.full(n, 1.0 / n), config.lower, config.upper)
    parametrization = ng.p.Array(init=uniform, lower=config.lower, upper=config.upper)
    parametrization.random_state = np.random.RandomState(config.seed)
    optimizer = ng.optimizers.registry[config.optimizer](parametrization=parametrization, budget=config.budget)
    history = []
    with warnings.catch_warnings():  # NGOpt's COBYLA warns about its own default tolerances
        warnings.filterwarnings("ignore", message=".*RHOEND.*")
        for _ in range(config.budget):
            candidate = optimizer.ask()
            weights = [float(w) for w in candidate.value]
            loss, value = objective(weights)
            optimizer.tell(candidate, value)
            history.append({"weights": weights, "loss": loss, "objective": value})
    return history


def _space(**overrides) -> SearchSpace:
    settings = {"n": 3, "lower": -3.0, "upper": 3.0, "budget": 20, "optimizer": "NGOpt", "seed": 0, "l1": 0.05}
    settings.update(overrides)
    return SearchSpace(**settings)


def _run(search: WeightSearch, loss=_quadratic) -> list[dict]:
    while not search.done:
        weights = search.ask()
        search.tell(weights, loss(weights))
    return search.history


@pytest.mark.parametrize("optimizer, n, lower, upper, seed", [
    ("NGOpt", 3, -3.0, 3.0, 0), ("NGOpt", 4, 0.5, 2.0, 5), ("OnePlusOne", 3, -3.0, 3.0, 1),
    ("TwoPointsDE", 3, -1.0, 1.0, 2),
])
def test_box_mode_asks_exactly_what_the_former_compose_loop_asked(optimizer, n, lower, upper, seed):
    config = SimpleNamespace(optimizer=optimizer, lower=lower, upper=upper, budget=25, seed=seed, l1=0.05)
    target = [0.6, 0.3, 0.1, -0.2][:n]

    def loss(weights):
        return _quadratic(weights, target)

    def objective(weights):
        value = loss(weights)
        return value, value + config.l1 * sum(abs(w) for w in weights) / len(weights)

    expected = _reference_search(objective, n, config)
    space = SearchSpace(n=n, lower=lower, upper=upper, budget=25, optimizer=optimizer, seed=seed, l1=0.05)
    assert _run(WeightSearch(space), loss) == expected
    assert search_weights(loss, n, config) == expected  # compose's thin wrapper
    assert len({tuple(h["weights"]) for h in expected}) > 5, "the search must move"


def test_the_seed_decides_the_candidates():
    first, again, other = (_run(WeightSearch(_space(optimizer="OnePlusOne", seed=s))) for s in (3, 3, 4))
    assert first == again and first != other


def test_tell_returns_the_penalised_objective_and_best_is_the_lowest():
    search = WeightSearch(_space(budget=6, l1=0.5))
    told = []
    while not search.done:
        weights = search.ask()
        objective = search.tell(weights, _quadratic(weights))
        assert objective == pytest.approx(_quadratic(weights) + 0.5 * sum(abs(w) for w in weights) / 3)
        assert objective == penalised(_quadratic(weights), weights, 0.5)
        told.append(objective)
    assert [h["objective"] for h in search.history] == told
    assert search.best["objective"] == min(told)
    search.best["weights"].append(99.0)  # copies: the search's own record is untouched
    assert len(search.best["weights"]) == 3


def test_simplex_candidates_are_distributions_and_the_search_beats_uniform():
    search = WeightSearch(_space(simplex=True, budget=40, l1=0.0))
    while not search.done:
        weights = search.ask()
        assert all(w >= 0 for w in weights) and abs(sum(weights) - 1) <= 1e-9, weights
        search.tell(weights, _quadratic(weights))
    uniform = _quadratic([1 / 3] * 3)
    assert search.best["loss"] < uniform / 4, (search.best, uniform)


def test_simplex_tells_nevergrad_the_objective_of_the_projected_weights():
    search = WeightSearch(_space(simplex=True, budget=5, l1=0.2))
    told, tell = [], search._optimizer.tell

    def spy(candidate, value):
        told.append((list(candidate.value), value))
        tell(candidate, value)

    search._optimizer.tell = spy
    for _ in range(5):
        weights = search.ask()
        search.tell(weights, _quadratic(weights))
    for (raw, value), h in zip(told, search.history):
        assert h["weights"] == project_simplex(raw)
        assert value == h["objective"] == pytest.approx(_quadratic(h["weights"]) + 0.2 / 3)  # mean |w| = 1/3


def test_project_simplex():
    assert project_simplex([2.0, 0.0, 2.0]) == [0.5, 0.0, 0.5]
    assert project_simplex([-1.0, 3.0]) == [0.0, 1.0]
    assert project_simplex([0.0, -2.0, 0.0, 0.0]) == [0.25] * 4
    weights = project_simplex([0.1, 0.7, 0.3, 1e-12])
    assert abs(sum(weights) - 1) <= 1e-12


@pytest.mark.filterwarnings("ignore:COBYLA")  # NGOpt's COBYLA on a budget of 2
def test_ask_and_tell_must_alternate():
    search = WeightSearch(_space(budget=2))
    with pytest.raises(RuntimeError, match="no candidate"):
        _ = search.best
    with pytest.raises(RuntimeError, match="without a pending ask"):
        search.tell([1 / 3] * 3, 1.0)
    weights = search.ask()
    with pytest.raises(RuntimeError, match="ask\\(\\) twice"):
        search.ask()
    with pytest.raises(ValueError, match="not the asked"):
        search.tell([w + 1e-3 for w in weights], 1.0)
    search.tell(weights, 1.0)
    search.tell(search.ask(), 0.5)
    assert search.done and search.best["loss"] == 0.5
    with pytest.raises(RuntimeError, match="budget"):
        search.ask()


@pytest.mark.parametrize("field, value, match", [
    ("optimizer", "NoSuchOptimizer", "unknown nevergrad optimizer"), ("n", 0, "n: "), ("budget", 0, "budget"),
    ("upper", -3.0, "upper"), ("lower", float("-inf"), "lower"), ("upper", float("nan"), "upper"),
    ("l1", -0.1, "l1"),
])
def test_invalid_spaces_are_refused(field, value, match):
    with pytest.raises(ConfigError, match=match):
        WeightSearch(_space(**{field: value}))


def test_it_runs_step_by_step_inside_an_event_loop():
    async def loss(weights):
        await asyncio.sleep(0)  # a server awaits its forward pass here
        return _quadratic(weights)

    async def main():
        search = WeightSearch(_space(simplex=True, budget=8))
        while not search.done:
            weights = search.ask()
            search.tell(weights, await loss(weights))
        return search.history

    assert asyncio.run(main()) == _run(WeightSearch(_space(simplex=True, budget=8)))


def test_mode_cotd_search_and_shots_import_no_serving_stack():
    code = ("import sys, mode_cotd.weight_search, mode_cotd.shots; "
            "bad = [m for m in ('ray', 'vllm', 'fastapi') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
