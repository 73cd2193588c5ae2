"""training.paired_bootstrap: the macro-averaged paired difference and its interval, against the plain loop."""

from __future__ import annotations

import numpy as np
import pytest

from mode_cotd.errors import ConfigError
from training.paired_bootstrap import paired_interval, reference_interval


def _routes(seed: int):
    rng = np.random.default_rng(seed)
    sizes = {"addsub": 30, "coin_flip": 45, "gsm8k": 12}
    a = {t: (rng.random(n) < 0.4).astype(int).tolist() for t, n in sizes.items()}
    b = {t: (rng.random(n) < 0.3).astype(int).tolist() for t, n in sizes.items()}
    return a, b


def test_matches_the_plain_reference():
    a, b = _routes(1)
    fast, plain = paired_interval(a, b, resamples=300, seed=7), reference_interval(a, b, resamples=300, seed=7)
    assert fast.diff == pytest.approx(plain.diff)
    assert fast.low == pytest.approx(plain.low) and fast.high == pytest.approx(plain.high)
    assert (fast.tasks, fast.examples) == (3, 87)


def test_the_difference_is_the_macro_average_in_points():
    a = {"x": [1, 1, 0, 0], "y": [1, 0]}
    b = {"x": [0, 0, 0, 0], "y": [1, 0]}
    result = paired_interval(a, b, resamples=200)
    assert result.diff == pytest.approx(100 * (0.5 + 0.0) / 2)
    assert result.low <= result.diff <= result.high


def test_identical_routes_have_a_zero_width_interval_and_shifted_ones_exclude_zero():
    a, _ = _routes(2)
    same = paired_interval(a, a, resamples=500)
    assert (same.diff, same.low, same.high) == (0.0, 0.0, 0.0)
    better = {t: [1] * len(v) for t, v in a.items()}
    assert paired_interval(better, a, resamples=500).low > 0


def test_mismatched_inputs_name_what_is_wrong():
    with pytest.raises(ConfigError, match="same non-empty tasks"):
        paired_interval({"x": [1]}, {"y": [1]})
    with pytest.raises(ConfigError, match="task 'x'"):
        paired_interval({"x": [1, 0]}, {"x": [1]})
