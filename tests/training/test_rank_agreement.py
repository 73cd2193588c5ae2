"""Spearman's correlation and regret, against scipy-free plain cases and a brute-force formula."""

from __future__ import annotations

import random

import pytest

from training.rank_agreement import ranks, regret, spearman


def test_ranks_share_ties():
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]


@pytest.mark.parametrize("seed", range(5))
def test_spearman_without_ties_is_the_classic_formula(seed):
    rng = random.Random(seed)
    x, y = rng.sample(range(100), 9), rng.sample(range(100), 9)
    d2 = sum((a - b) ** 2 for a, b in zip(ranks(x), ranks(y)))
    assert spearman(x, y) == pytest.approx(1 - 6 * d2 / (9 * (81 - 1)))


def test_perfect_agreement_reversal_and_constants():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [0.2, 0.2, 0.2]) is None
    with pytest.raises(ValueError):
        spearman([1], [1])


def test_regret_is_the_accuracy_lost_by_the_objectives_pick():
    assert regret([0.5, 0.1, 0.9], [0.3, 0.2, 0.4]) == pytest.approx(0.2)
    assert regret([0.1, 0.1], [0.1, 0.5]) == pytest.approx(0.4)  # a tie goes to the earlier candidate
    assert regret([0.2, 0.1], [0.1, 0.5]) == 0.0
