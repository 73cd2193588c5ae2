"""Statistics of request records: percentiles, TTFT/TPOT/ITL and throughput."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from benchmarks.stats import RequestRecord, distribution, percentile, ratio, summarise


def test_percentile_matches_numpy_linear():
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        values = [rng.uniform(0, 10) for _ in range(n)]
        for q in (0, 1, 50, 90, 99, 100):
            assert math.isclose(percentile(values, q), float(np.percentile(values, q)))
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution_scales_and_handles_empty():
    d = distribution([0.001, 0.002, 0.003], 1000.0)
    assert d["n"] == 3 and math.isclose(d["mean"], 2.0) and math.isclose(d["p50"], 2.0) and math.isclose(d["max"], 3.0)
    assert distribution([]) == {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}


def _record(index: int, start: float, ttft: float, gaps: list[float], tokens: int, error: str | None = None):
    end = start + ttft + sum(gaps)
    return RequestRecord(index=index, start_s=start, end_s=end, ttft_s=ttft, itl_s=gaps, output_tokens=tokens,
                         prompt_tokens=10, error=error)


def test_summarise_throughput_and_latencies():
    records = [_record(0, 0.0, 0.5, [0.1] * 9, 10), _record(1, 0.5, 1.0, [0.2] * 9, 10),
               _record(2, 0.2, 0.3, [], 0, error="HTTP 500")]
    s = summarise(records)
    wall = (0.5 + 1.0 + 1.8) - 0.0  # first start to last end
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == ["HTTP 500"]
    assert math.isclose(s["duration_s"], wall)
    assert s["output_tokens"] == 20 and s["prompt_tokens"] == 20
    assert math.isclose(s["output_throughput_tok_s"], 20 / wall)
    assert math.isclose(s["request_throughput_rps"], 2 / wall)
    assert math.isclose(s["ttft_ms"]["p50"], 750.0)
    assert math.isclose(records[0].tpot_s, 0.1) and math.isclose(records[1].tpot_s, 0.2)
    assert math.isclose(s["tpot_ms"]["mean"], 150.0)
    assert s["itl_ms"]["n"] == 18 and math.isclose(s["itl_ms"]["p50"], 150.0)


def test_tpot_needs_two_tokens_and_a_first_token():
    assert _record(0, 0, 0.5, [], 1).tpot_s is None
    assert RequestRecord(index=0, start_s=0, end_s=1, output_tokens=5).tpot_s is None


def test_summarise_empty_and_ratio():
    s = summarise([])
    assert s["requests"] == 0 and s["output_throughput_tok_s"] is None
    assert ratio(10.0, 4.0) == 2.5
    assert ratio(None, 4.0) is None and ratio(1.0, 0.0) is None and ratio(1.0, None) is None
