"""The gate's abstention threshold: the most accurate τ against a plain reference, smallest among ties."""

from __future__ import annotations

import random

import pytest

from training.abstention import calibrate_abstention


def _reference(probs, shared, gate):
    """Every τ in a fine grid of [0, 1], by brute force: (best accuracy, smallest τ reaching it)."""
    best = None
    for step in range(100001):
        tau = step / 100000
        acc = sum(s if p < tau else g for p, s, g in zip(probs, shared, gate)) / len(probs)
        if best is None or acc > best[0] + 1e-12:
            best = (acc, tau)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_the_threshold_is_as_accurate_as_a_brute_force_search(seed):
    rng = random.Random(seed)
    probs = [round(rng.random(), 3) for _ in range(40)]
    shared = [rng.random() < 0.3 for _ in probs]
    gate = [rng.random() < 0.3 + 0.4 * p for p in probs]  # the gate is right more often when it is sure
    result = calibrate_abstention(probs, shared, gate)
    best_acc, best_tau = _reference(probs, shared, gate)
    assert result.accuracy == pytest.approx(best_acc)
    assert result.abstain_below <= best_tau + 1e-9  # no larger than the reference's smallest τ
    assert result.abstained == sum(p < result.abstain_below for p in probs)
    assert result.gate_accuracy == sum(gate) / 40 and result.shared_accuracy == sum(shared) / 40


def test_a_gate_that_is_always_better_never_abstains():
    result = calibrate_abstention([0.2, 0.5, 0.9], [False, False, True], [True, True, True])
    assert (result.abstain_below, result.abstained, result.accuracy) == (0.0, 0, 1.0)


def test_unsure_prompts_abstain_when_the_shared_adapter_wins_on_them():
    result = calibrate_abstention([0.2, 0.3, 0.9, 0.95], [True, True, False, False], [False, False, True, True])
    assert result.abstained == 2 and 0.3 < result.abstain_below <= 0.9 and result.accuracy == 1.0


@pytest.mark.parametrize("args", [([], [], []), ([0.5], [True], []), ([1.5], [True], [False])])
def test_bad_inputs_are_refused(args):
    with pytest.raises(ValueError):
        calibrate_abstention(*args)
