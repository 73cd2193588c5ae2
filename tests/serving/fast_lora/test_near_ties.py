"""The rule the greedy-equivalence tests hold two engines' generations to (same_up_to_near_ties), on made-up data."""

import pytest

from .test_greedy_equivalence import NEAR_TIE, TIED_ELSEWHERE, same_up_to_near_ties


def _engine(tokens: list[int], top: int, other: int, gap: float) -> dict:
    """One engine's result: one sequence whose last position ranks `top` `gap` nats above `other`."""
    logprobs = [{str(t): 0.0} for t in tokens[:-1]] + [{str(top): -0.1, str(other): -0.1 - gap}]
    return {"seq": [tokens], "seq_logprobs": [logprobs]}


@pytest.mark.parametrize("gap_a, gap_b", [(0.0, 0.0), (NEAR_TIE, NEAR_TIE), (0.0, TIED_ELSEWHERE),
                                          (TIED_ELSEWHERE, 0.0)])
def test_a_flip_at_a_near_tie_is_allowed_and_reported(gap_a, gap_b):
    a, b = _engine([1, 2, 3], 3, 4, gap_a), _engine([1, 2, 4], 4, 3, gap_b)
    flips = same_up_to_near_ties(a, b, "seq")
    assert flips == [{"sequence": "seq[0]", "position": 2, "gap_fast": gap_a, "gap_plain": gap_b}]


@pytest.mark.parametrize("gap_a, gap_b", [(NEAR_TIE, 2 * NEAR_TIE), (0.01, TIED_ELSEWHERE), (0.0, 1.0),
                                          (2.0, 0.0)])
def test_a_flip_that_was_no_tie_fails(gap_a, gap_b):
    a, b = _engine([1, 2, 3], 3, 4, gap_a), _engine([1, 2, 4], 4, 3, gap_b)
    with pytest.raises(AssertionError, match="no tie"):
        same_up_to_near_ties(a, b, "seq")


def test_identical_generations_have_no_flips():
    a = _engine([1, 2, 3], 3, 4, 1.0)
    assert same_up_to_near_ties(a, a, "seq") == []
