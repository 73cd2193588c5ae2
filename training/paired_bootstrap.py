"""Paired bootstrap intervals for the difference of two routes' macro-averaged accuracy.

Two routes A and B answered the same test examples of each task. For a set of tasks T, with
c_X[t][i] ∈ {0, 1} the correctness of route X on example i of task t (n_t examples):

    diff = (1/|T|) Σ_t (1/n_t) Σ_i (c_A[t][i] - c_B[t][i])        (in points: × 100)

i.e. the macro average over tasks, as the accuracy table reports it. The interval resamples
each task's examples with replacement, the same draws for A and B (paired), `resamples`
times with a seeded generator, and takes the 2.5th and 97.5th percentiles of the resampled
diff (a stratified percentile bootstrap: the tasks are fixed, their examples are the sample).
`reference_interval` is the plain loop the vectorised version is tested against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mode_cotd.errors import ConfigError


@dataclass(frozen=True)
class PairedDifference:
    """Route A minus route B, macro-averaged over tasks, in accuracy points (0-100)."""

    diff: float
    """The observed difference."""
    low: float
    """Lower end of the 95% interval."""
    high: float
    """Upper end of the 95% interval."""
    tasks: int
    """Tasks averaged over."""
    examples: int
    """Paired examples in all."""


def _checked(a: Mapping[str, Sequence[int]], b: Mapping[str, Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    if not a or set(a) != set(b):
        raise ConfigError(f"paired bootstrap: both routes need the same non-empty tasks, got {sorted(a)} "
                          f"and {sorted(b)}")
    pairs = []
    for task in sorted(a):
        x, y = np.asarray(a[task], dtype=np.float64), np.asarray(b[task], dtype=np.float64)  # [n_t], [n_t]
        if x.shape != y.shape or x.ndim != 1 or x.size == 0:
            raise ConfigError(f"paired bootstrap: task {task!r} needs the same number (> 0) of examples for "
                              f"both routes, got {x.size} and {y.size}")
        pairs.append((x, y))
    return pairs


def paired_interval(a: Mapping[str, Sequence[int]], b: Mapping[str, Sequence[int]], resamples: int = 10_000,
                    seed: int = 0) -> PairedDifference:
    """The macro-averaged difference A - B with its 95% paired bootstrap interval (module docstring)."""
    pairs = _checked(a, b)
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)  # [R]
    for x, y in pairs:
        d = x - y  # [n_t]
        draws = rng.integers(0, d.size, size=(resamples, d.size))  # [R, n_t]
        total += d[draws].mean(axis=1)  # [R]
    boot = 100 * total / len(pairs)  # [R]
    diff = 100 * float(np.mean([np.mean(x - y) for x, y in pairs]))
    low, high = np.percentile(boot, [2.5, 97.5])
    return PairedDifference(diff, float(low), float(high), len(pairs), sum(x.size for x, _ in pairs))


def reference_interval(a: Mapping[str, Sequence[int]], b: Mapping[str, Sequence[int]], resamples: int = 10_000,
                       seed: int = 0) -> PairedDifference:
    """The same statistic as `paired_interval`, one resample and one task at a time (same generator draws)."""
    pairs = _checked(a, b)
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, x.size, size=(resamples, x.size)) for x, _ in pairs]
    boot = []
    for r in range(resamples):
        per_task = []
        for (x, y), d in zip(pairs, draws):
            idx = d[r]
            per_task.append(sum(x[i] - y[i] for i in idx) / len(idx))
        boot.append(100 * sum(per_task) / len(per_task))
    diff = 100 * sum(sum(x - y) / x.size for x, y in pairs) / len(pairs)
    low, high = np.percentile(boot, [2.5, 97.5])
    return PairedDifference(float(diff), float(low), float(high), len(pairs), sum(x.size for x, _ in pairs))
