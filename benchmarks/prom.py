"""Reading a server's Prometheus /metrics: samples, counter deltas, and histogram quantiles.

`histogram_quantile` follows PromQL's function of that name: find the bucket where the
cumulative count crosses q·total and interpolate linearly inside it (the lowest bucket starts
at 0; a quantile in the +Inf bucket is the highest finite bound). So a quantile is an estimate,
as exact as the buckets (serving/metrics.py: 5, 10, 25, 50, 100, 250 ms...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""(sample name, sorted labels) -> value."""


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(base_url: str, timeout_s: float = 30.0) -> Samples:
    """GET /metrics of a server, parsed."""
    return parse(httpx.get(f"{base_url.rstrip('/')}/metrics", timeout=timeout_s).text)


def total(samples: Samples, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    want = dict(labels or {})
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == val for k, val in want.items()))


def delta(before: Samples, after: Samples) -> Samples:
    """after - before, sample by sample (counters and histogram series)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def buckets(samples: Samples, histogram: str) -> list[tuple[float, float]]:
    """[(upper bound, cumulative count)] of a histogram, summed over its other labels, by bound."""
    by_bound: dict[float, float] = {}
    for (name, labels), value in samples.items():
        if name == f"{histogram}_bucket":
            bound = float(dict(labels)["le"])
            by_bound[bound] = by_bound.get(bound, 0.0) + value
    return sorted(by_bound.items())


def histogram_quantile(q: float, bucket_counts: list[tuple[float, float]]) -> float | None:
    """PromQL's histogram_quantile over [(upper bound, cumulative count)]; None without observations."""
    if not bucket_counts or bucket_counts[-1][1] <= 0:
        return None
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    rank = q * bucket_counts[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in bucket_counts:
        if count >= rank and count > lower_count:
            if math.isinf(bound):
                return lower_bound  # the highest finite bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def histogram_summary(samples: Samples, histogram: str, scale: float = 1.0) -> dict[str, float | int | None]:
    """{n, mean, p50, p90, p99} of a histogram's observations (quantiles estimated from its buckets)."""
    count = total(samples, f"{histogram}_count")
    summed = total(samples, f"{histogram}_sum")
    bucket_counts = buckets(samples, histogram)

    def q(value: float) -> float | None:
        found = histogram_quantile(value, bucket_counts)
        return None if found is None else found * scale

    return {"n": int(count), "mean": summed / count * scale if count else None,
            "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}
