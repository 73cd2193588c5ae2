"""Workloads: the mixture pool, popularities, the LRU hit rate and fresh mixtures."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from benchmarks.workloads import (
    FreshMixtures,
    Popularity,
    draw_indices,
    draw_mixtures,
    grid_weights,
    lru_hit_rate,
    mixture_key,
    mixture_pool,
    zipf_probabilities,
)
from mode_cotd.errors import ConfigError

EXPERTS = [f"e{i}" for i in range(10)]


def test_grid_weights_are_positive_grid_points_summing_to_one():
    assert grid_weights(2, 0.25) == [(0.25, 0.75), (0.5, 0.5), (0.75, 0.25)]
    assert grid_weights(1, 0.05) == [(1.0,)]
    for w in grid_weights(3, 0.1):
        assert len(w) == 3 and min(w) > 0 and math.isclose(sum(w), 1.0)
    assert len(grid_weights(2, 0.05)) == 19
    assert len(grid_weights(3, 0.1)) == math.comb(9, 2)
    with pytest.raises(ConfigError):
        grid_weights(2, 0.3)  # does not divide 1
    with pytest.raises(ConfigError):
        grid_weights(5, 0.25)  # more experts than grid units


def test_pool_has_every_mixture_once_in_a_seeded_order():
    pool = mixture_pool(EXPERTS, 2, 0.05, seed=0)
    assert len(pool) == math.comb(10, 2) * 19
    assert len({mixture_key(m) for m in pool}) == len(pool)
    assert all(len(m) == 2 and math.isclose(sum(m.values()), 1.0) for m in pool)
    assert pool == mixture_pool(EXPERTS, 2, 0.05, seed=0)
    assert pool != mixture_pool(EXPERTS, 2, 0.05, seed=1)
    assert [m for m in mixture_pool(EXPERTS, 1, 0.05)] and all(list(m.values()) == [1.0]
                                                              for m in mixture_pool(EXPERTS, 1, 0.05))
    with pytest.raises(ConfigError):
        mixture_pool(EXPERTS, 11, 0.05)


def test_popularity_names():
    assert Popularity.parse("zipf:1.1") == Popularity("zipf", 1.1)
    assert Popularity.parse("skewed") == Popularity("zipf", 1.5)
    assert Popularity.parse(" Distinct ") == Popularity("distinct")
    for bad in ("zipf:0", "zipf:-1", "zipf:x", "zipf:inf", "pareto"):
        with pytest.raises(ConfigError):
            Popularity.parse(bad)


def test_each_popularity_spreads_requests_as_named():
    n, size = 2000, 50
    assert draw_indices("distinct", size, n) == [i % size for i in range(n)]
    assert draw_indices("identical", size, n) == [0] * n
    uniform = Counter(draw_indices("uniform", size, n, seed=3))
    assert set(uniform) <= set(range(size)) and len(uniform) == size
    assert max(uniform.values()) < 4 * n / size
    zipf = Counter(draw_indices("zipf:1.1", size, n, seed=3))
    assert zipf.most_common(1)[0][0] == 0 and zipf[0] > 5 * zipf.get(size - 1, 0)
    skewed = Counter(draw_indices("skewed", size, n, seed=3))
    assert skewed[0] / n > zipf[0] / n  # steeper than zipf:1.1
    assert draw_indices("zipf:1.1", size, n, seed=3) == draw_indices("zipf:1.1", size, n, seed=3)


def test_zipf_probabilities_follow_the_power_law():
    p = zipf_probabilities(4, 1.0)
    assert math.isclose(sum(p), 1.0)
    assert math.isclose(p[0] / p[1], 2.0) and math.isclose(p[0] / p[3], 4.0)


def test_draw_mixtures_distinct_never_repeats_within_the_pool():
    mixtures = draw_mixtures("distinct", EXPERTS, 2, 0.05, 100)
    assert len({mixture_key(m) for m in mixtures}) == 100


def test_lru_hit_rate():
    assert lru_hit_rate(["a", "a", "a", "a"], 1) == 0.75
    assert lru_hit_rate(["a", "b", "a", "b"], 1) == 0.0  # each evicts the other
    assert lru_hit_rate(["a", "b", "a", "b"], 2) == 0.5
    assert lru_hit_rate(["a", "b", "c", "a"], 2) == 0.0  # a was least recently used
    assert lru_hit_rate(["a", "b", "a", "c", "a"], 2) == 0.4  # a was refreshed, b evicted
    assert lru_hit_rate([], 4) == 0.0
    with pytest.raises(ConfigError):
        lru_hit_rate(["a"], 0)


def test_fresh_mixtures_are_never_handed_out_twice():
    pool = mixture_pool(EXPERTS[:3], 2, 0.25)  # 3 pairs x 3 weightings = 9
    fresh = FreshMixtures(pool)
    fresh.mark_used([pool[0], pool[2], {}])
    first = fresh.take(3)
    assert pool[0] not in first and pool[2] not in first
    rest = fresh.take(4)
    keys = [mixture_key(m) for m in first + rest]
    assert len(set(keys)) == 7
    with pytest.raises(ConfigError):
        fresh.take(1)
