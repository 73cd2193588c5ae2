"""Reading /metrics: parsing, deltas and PromQL-style histogram quantiles."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from benchmarks import prom


def _exposition(builds: list[float], hits: int) -> str:
    registry = CollectorRegistry()
    hist = Histogram("mode_cotd_composite_build_seconds", "build", buckets=(0.05, 0.1, 0.25), registry=registry)
    counter = Counter("mode_cotd_composite_cache_hits", "hits", registry=registry)
    for b in builds:
        hist.observe(b)
    counter.inc(hits)
    return generate_latest(registry).decode()


def test_histogram_quantile_interpolates_in_buckets_like_promql():
    buckets = [(0.05, 2.0), (0.1, 6.0), (0.25, 8.0), (math.inf, 8.0)]
    assert math.isclose(prom.histogram_quantile(0.25, buckets), 0.05)  # rank 2: top of the first bucket
    assert math.isclose(prom.histogram_quantile(0.5, buckets), 0.05 + 0.05 * (4 - 2) / 4)  # rank 4
    assert math.isclose(prom.histogram_quantile(0.125, buckets), 0.025)  # rank 1, first bucket starts at 0
    assert math.isclose(prom.histogram_quantile(1.0, buckets), 0.25)
    assert prom.histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == 0.1  # in +Inf: highest finite bound
    assert prom.histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert prom.histogram_quantile(0.5, []) is None
    with pytest.raises(ValueError):
        prom.histogram_quantile(1.5, buckets)


def test_parse_delta_and_summary():
    before = prom.parse(_exposition([0.01, 0.02], 3))
    after = prom.parse(_exposition([0.01, 0.02, 0.07, 0.08, 0.2], 10))
    d = prom.delta(before, after)
    assert prom.total(d, "mode_cotd_composite_cache_hits_total") == 7
    assert prom.total(d, "mode_cotd_composite_build_seconds_count") == 3
    summary = prom.histogram_summary(d, "mode_cotd_composite_build_seconds", 1000.0)
    assert summary["n"] == 3 and math.isclose(summary["mean"], 350.0 / 3)
    # the three new builds: two in (50, 100] ms, one in (100, 250] ms; the median is in the second bucket
    assert 50.0 < summary["p50"] <= 100.0 and 100.0 < summary["p99"] <= 250.0
    assert prom.total(after, "mode_cotd_composite_build_seconds_bucket", {"le": "0.05"}) == 2
    assert prom.histogram_summary({}, "nothing") == {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None}
