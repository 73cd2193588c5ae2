"""When the gate should route a prompt to the shared adapter alone: its abstention threshold, calibrated.

A bundle with a shared adapter serves a gate mixture on top of it (student + shared + residual
mixture). Where no expert fits a prompt, the shared adapter alone may do better: the gate then
abstains (mode_cotd.gate.GateConfig.abstain_below / abstain_to). The threshold τ is chosen on
held-out train prompts of the seen tasks (never a test file) from, per prompt i: the gate's top
probability pᵢ, and whether each route answered it correctly:

    accuracy(τ) = mean over i of  [ shared_correctᵢ  if pᵢ < τ  else  gate_correctᵢ ]

τ runs over 0 and each distinct pᵢ nudged just above it (so that exactly the prompts with pᵢ ≤ that value
abstain); the most accurate wins, the smallest τ among ties (abstain as little as the data allows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class AbstentionCalibration:
    """The chosen threshold and what it did on the calibration prompts."""

    abstain_below: float
    """τ: the gate abstains when its top probability is below this (0: never)."""
    accuracy: float
    """Accuracy of the calibrated rule on the calibration prompts."""
    gate_accuracy: float
    """Accuracy with τ = 0 (the gate's mixture on every prompt)."""
    shared_accuracy: float
    """Accuracy of the shared adapter alone on every prompt."""
    abstained: int
    """Prompts that abstain under τ."""
    n: int
    """Calibration prompts."""

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate_abstention(top_probs: Sequence[float], shared_correct: Sequence[bool],
                         gate_correct: Sequence[bool]) -> AbstentionCalibration:
    """The τ of the module docstring; ValueError for empty or unequal inputs or a probability outside [0, 1]."""
    n = len(top_probs)
    if n == 0 or len(shared_correct) != n or len(gate_correct) != n:
        raise ValueError(f"calibration needs one probability and two outcomes per prompt, got {n}, "
                         f"{len(shared_correct)} and {len(gate_correct)}")
    if any(not 0 <= p <= 1 for p in top_probs):
        raise ValueError("top probabilities must lie in [0, 1]")

    def outcome(tau: float) -> tuple[int, int]:
        rows = [(p < tau, s if p < tau else g) for p, s, g in zip(top_probs, shared_correct, gate_correct)]
        return sum(a for a, _ in rows), sum(c for _, c in rows)

    candidates = [0.0] + sorted({min(1.0, math.nextafter(p, math.inf)) for p in top_probs})
    scored = [(outcome(tau), tau) for tau in candidates]
    (abstained, correct), tau = max(scored, key=lambda item: (item[0][1], -item[1]))
    return AbstentionCalibration(abstain_below=tau, accuracy=correct / n, gate_accuracy=sum(gate_correct) / n,
                                 shared_accuracy=sum(shared_correct) / n, abstained=abstained, n=n)
