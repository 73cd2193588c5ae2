"""The mixture: units of a grid, held to plain references (fractions, the float key it replaced, enumeration)."""

from __future__ import annotations

import hashlib
import itertools
import pickle
import random
from fractions import Fraction

import pytest

from mode_cotd.errors import ConfigError
from mode_cotd.mixture import Mixture, count_units, rank_units, unrank_units


def reference_weights(experts, weights) -> dict[str, float]:
    """The float key mode_cotd.gate kept before: weights rounded to 10 decimals, -0.0 made 0.0."""
    return {e: round(float(w), 10) + 0.0 for e, w in sorted(zip(experts, weights))}


def reference_text(weights: dict[str, float]) -> str:
    def fmt(w: float) -> str:
        whole, _, frac = f"{w:.10f}".rstrip("0").partition(".")
        return f"{whole}.{frac.ljust(2, '0')}"

    return ",".join(f"{e}={fmt(w)}" for e, w in weights.items())


def random_mixtures(seed: int, count: int):
    """(experts, units, n) on decimal grids (n dividing 10**10: what every configured grid is)."""
    rng = random.Random(seed)
    names = ["addsub", "aqua", "gsm8k", "svamp", "last_letter_concatenation", "a.b-c_d"]
    for _ in range(count):
        n = rng.choice([1, 2, 4, 5, 8, 10, 20, 40, 100, 1000])
        experts = rng.sample(names, rng.randint(1, 4))
        yield tuple(experts), tuple(rng.randint(-2 * n, 2 * n) for _ in experts), n


def test_weights_are_units_over_n_exactly():
    for experts, units, n in random_mixtures(0, 300):
        m = Mixture(experts, units=units, n=n)
        expected = {e: Fraction(u, n) for e, u in zip(experts, units)}
        assert list(m.experts) == sorted(experts)
        assert {e: Fraction(u, m.n) for e, u in zip(m.experts, m.units)} == expected
        assert m.as_dict() == {e: float(w) for e, w in sorted(expected.items())}
        assert m.weights == tuple(float(expected[e]) for e in m.experts)


def test_text_digest_and_float_views_match_the_float_key_they_replace():
    for experts, units, n in random_mixtures(1, 300):
        floats = [u / n for u in units]
        ref = reference_weights(experts, floats)
        for m in (Mixture(experts, units=units, n=n), Mixture(experts, floats)):
            assert m.as_dict() == ref
            assert str(m) == reference_text(ref)
            assert m.digest == hashlib.sha256(reference_text(ref).encode()).hexdigest()[:16]


def test_numbers_are_rounded_to_ten_decimals():
    m = Mixture(("b", "a"), (0.3, 0.7))
    assert (m.experts, m.units, m.n) == (("a", "b"), (7, 3), 10)
    assert m == Mixture(("a", "b"), (0.7, 0.3000000000000001)) == Mixture(("a", "b"), (0.70000000004, 0.3))
    assert Mixture(("a",), (-1e-12,)).weights == (0.0,)
    odd = Mixture(("a", "b"), (1 / 3, 2 / 3))
    assert odd.as_dict() == {"a": 0.3333333333, "b": 0.6666666667} and odd.n == 10**10


def test_equal_mixtures_are_equal_values_with_one_hash_whatever_their_grid():
    forms = [
        Mixture(("gsm8k", "addsub"), units=(13, 7), n=20),
        Mixture(("addsub", "gsm8k"), units=(70, 130), n=200),
        Mixture(("gsm8k", "addsub"), (0.65, 0.35)),
        Mixture.from_units({"gsm8k": 13, "svamp": 0, "addsub": 7}, 20),
        Mixture.from_dict({"gsm8k": 0.651, "addsub": 0.349}, grid=0.05),
        Mixture.from_dict({"gsm8k": 0.65, "addsub": 0.35}, grid=0.05, normalise=False),
    ]
    assert all(f == forms[0] for f in forms) and len({hash(f) for f in forms}) == 1
    assert len({f.digest for f in forms}) == 1
    assert (forms[0].units, forms[0].n) == ((7, 13), 20)
    assert forms[0] != Mixture(("gsm8k", "addsub"), units=(12, 8), n=20)
    assert Mixture(("a", "b"), (1.0, 0.0)) != Mixture.one("a")  # given zero units stay: another text, digest


def test_a_mixture_survives_pickling():
    m = Mixture.from_units({"a": 3, "b": 17}, 20)
    assert pickle.loads(pickle.dumps(m)) == m


def test_one_expert():
    one = Mixture.one("gsm8k")
    assert one == Mixture(("gsm8k",), (1.0,)) == Mixture(("gsm8k",), units=(20,), n=20)
    assert one.sole_expert == "gsm8k" and one.weights == (1.0,)
    assert Mixture(("gsm8k",), (0.5,)).sole_expert is None
    assert Mixture(("a", "b"), (0.5, 0.5)).sole_expert is None


def test_units_on_another_grid_and_expert_order():
    m = Mixture.from_units({"b": 3, "a": 1}, 4)
    assert m.units_on(["a", "b", "c"], 20) == (5, 15, 0)
    assert m.units_on(["c", "b", "a"], 4) == (0, 3, 1)
    assert m.units_on(["a", "b"], 10) is None  # 0.25 is not a multiple of 0.1
    assert m.units_on(["a", "c"], 20) is None  # b is not among them
    for experts, units, n in random_mixtures(2, 200):
        mixture, names = Mixture(experts, units=units, n=n), sorted(experts) + ["zz"]
        for grid in (20, 40, 1000):
            got = mixture.units_on(names, grid)
            exact = [Fraction(dict(zip(experts, units)).get(e, 0) * grid, n) for e in names]
            assert got == (tuple(int(x) for x in exact) if all(x.denominator == 1 for x in exact) else None)


def reference_compositions(n: int, parts: int) -> list[tuple[int, ...]]:
    """Every (u₁, …, u_E) with uᵢ ≥ 0 and Σuᵢ = n, in colexicographic order of the bar positions."""
    def bars(units):
        return tuple(sum(units[: j + 1]) + j for j in range(parts - 1))

    every = [u for u in itertools.product(range(n + 1), repeat=parts) if sum(u) == n]
    return sorted(every, key=lambda u: bars(u)[::-1])


@pytest.mark.parametrize("n,parts", [(1, 1), (5, 1), (3, 2), (4, 3), (6, 4), (2, 10), (20, 3)])
def test_ids_rank_every_weight_vector_densely_and_round_trip(n, parts):
    every = reference_compositions(n, parts)
    assert len(every) == count_units(n, parts)
    for rank, units in enumerate(every):
        assert rank_units(units) == rank
        assert unrank_units(rank, n, parts) == units


def test_a_mixtures_id_round_trips_through_a_union_order():
    names = ["addsub", "aqua", "gsm8k", "svamp"]
    for units in reference_compositions(20, 4)[::7]:
        mixture = Mixture.from_units(dict(zip(names, units)), 20)
        on_grid = mixture.units_on(names, 20)
        back = unrank_units(rank_units(on_grid), 20, len(names))
        assert Mixture.from_units(dict(zip(names, back)), 20) == mixture


def test_an_id_out_of_range_is_refused():
    with pytest.raises(ValueError):
        unrank_units(count_units(4, 3), 4, 3)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((("a", "b"), (0.5,)), {}, ConfigError, "exactly one weight"),
        (((), ()), {}, ConfigError, "at least one expert"),
        ((("a", "a"), (0.5, 0.5)), {}, ConfigError, "twice"),
        ((("a/b",), (1.0,)), {}, ConfigError, "not a valid name"),
        ((("a",), (float("nan"),)), {}, ConfigError, "finite number"),
        ((("a",), (True,)), {}, ConfigError, "finite number"),
        ((("a",),), {"units": (0.5,), "n": 2}, ConfigError, "integers"),
        ((("a",),), {"units": (1,), "n": 0}, ConfigError, "n >= 1"),
        ((("a",), (1.0,)), {"units": (1,), "n": 1}, TypeError, "not both"),
        ((("a",),), {"units": (1,)}, TypeError, "units and n"),
    ],
)
def test_invalid_mixtures_are_refused(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        Mixture(*args, **kwargs)
