"""How well an objective ranks candidates by accuracy: Spearman's correlation and the regret of its pick.

    spearman(x, y)   Pearson's correlation of the ranks of x and of y (ties get their mean rank);
                     None when either is constant (no ranking to agree with)
    regret(o, acc)   max(acc) - acc[argmin(o)]: accuracy lost by taking the candidate the objective
                     (lower is better) puts first; ties in o go to the earlier candidate
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            out[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation of x and y (same length >= 2), or None when either is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of one length >= 2, got {len(x)} and {len(y)}")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def regret(objective: Sequence[float], accuracy: Sequence[float]) -> float:
    """Best accuracy minus the accuracy of the candidate with the lowest objective."""
    if len(objective) != len(accuracy) or not objective:
        raise ValueError("regret needs one objective value per accuracy, at least one")
    pick = min(range(len(objective)), key=lambda i: objective[i])
    return max(accuracy) - accuracy[pick]
