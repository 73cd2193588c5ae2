"""The scaling measurements on mode-cotd: distinct mixtures in flight, new-composite cost, cache hit rate.

- A scaling row takes M mixtures no request has used (new composites). Build phase: one
  1-token request per mixture (a short prompt), all at once; the server's /metrics give the build times of the
  M composites (histogram `mode_cotd_composite_build_seconds`). Throughput phase: requests
  round robin over the M mixtures at a fixed concurrency, so M distinct mixtures are in flight.
- The hit-rate workload draws mixtures of k of all experts on the grid with a popularity
  (zipf:1.1 by default), sends one short 1-token request for each, and reads the server's cache hit and miss counters (the request that
  builds a composite is a miss; every other request for it, even while it is being built, a hit).
- New against cached TTFT: one request at a time, a never-seen mixture then the same mixture
  again, short prompt and output, repeated: TTFT of a new mixture over that of a cached one.
- The same workload, much longer, through an LRU of the server's capacity offline: the
  steady-state hit rate, for the run's grid and coarser ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import loadgen, prom
from benchmarks.config import BenchConfig
from benchmarks.prompts import Prompt
from benchmarks.scenarios import GATE_MODEL
from benchmarks.stats import RequestRecord, distribution, summarise
from benchmarks.workloads import FreshMixtures, draw_mixtures, grid_weights, lru_hit_rate, mixture_key
from mode_cotd.errors import ConfigError

BUILD_HISTOGRAM = "mode_cotd_composite_build_seconds"
SHORT_PROMPT = Prompt("short", "Q: What is 2 + 3?\nA:")
"""The prompt of requests that only make the server build or look up a composite (hit rate, build phases)."""
DEFAULT_CACHE_ENTRIES = 64
"""`mode-cotd serve`'s default `--cache-max-entries`."""

SaveRecords = Callable[[str, Sequence[RequestRecord]], None]


def cache_entries(serve_args: Sequence[str]) -> int:
    """The server's composite cache capacity: `--cache-max-entries` among the serve flags, else the default."""
    for i, arg in enumerate(serve_args):
        if arg.startswith("--cache-max-entries="):
            return int(arg.split("=", 1)[1])
        if arg == "--cache-max-entries" and i + 1 < len(serve_args):
            return int(serve_args[i + 1])
    return DEFAULT_CACHE_ENTRIES


def _cache_counts(samples: prom.Samples) -> dict[str, float]:
    counts = {name: prom.total(samples, f"mode_cotd_composite_{name}_total")
              for name in ("cache_hits", "cache_misses", "builds", "cache_evictions")}
    counts["union_requests"] = prom.total(samples, "mode_cotd_mixture_union_requests_total")
    return counts


def _specs(prompts: Sequence[Prompt], mixtures: Sequence[dict[str, float]], max_tokens: int,
           n: int | None = None) -> list[loadgen.RequestSpec]:
    n = len(mixtures) if n is None else n
    return [loadgen.RequestSpec(GATE_MODEL, prompts[i % len(prompts)].text, max_tokens,
                                mixture=dict(mixtures[i % len(mixtures)])) for i in range(n)]


def hit_rate_phase(base_url: str, prompts: Sequence[Prompt], experts: Sequence[str], config: BenchConfig,
                   fresh: FreshMixtures, save: SaveRecords) -> dict[str, Any]:
    """The composite cache's hit rate under `config.hit_rate_popularity` (server counters)."""
    n = config.hit_rate_requests
    mixtures = draw_mixtures(config.hit_rate_popularity, experts, config.mixture_k, config.mixture_grid, n,
                             config.seed + 3)
    fresh.mark_used(mixtures)
    before = prom.scrape(base_url)
    records = loadgen.run(base_url, _specs([SHORT_PROMPT], mixtures, config.hit_rate_output_tokens),
                          concurrency=config.hit_rate_concurrency)
    counts = _cache_counts(prom.delta(before, prom.scrape(base_url)))
    save("hit-rate", records)
    looked_up = counts["cache_hits"] + counts["cache_misses"] + counts["union_requests"]
    distinct = len({mixture_key(m) for m in mixtures})
    summary = summarise(records)
    return {
        "popularity": config.hit_rate_popularity, "experts": len(experts), "k": config.mixture_k,
        "grid": config.mixture_grid, "requests": n, "concurrency": config.hit_rate_concurrency,
        "distinct_mixtures": distinct, **counts,
        "hit_rate": (counts["cache_hits"] + counts["union_requests"]) / looked_up if looked_up else None,
        "hit_rate_counts": "requests served without building a composite (cache hits and union requests) / all",
        "ideal_hit_rate": 1 - distinct / n if n else None,
        "capacity": cache_entries(config.serve_args),
        "failed": summary["failed"], "errors": summary["errors"], "duration_s": summary["duration_s"],
    }


def scaling_row(base_url: str, in_flight: int, prompts: Sequence[Prompt], config: BenchConfig,
                fresh: FreshMixtures, save: SaveRecords) -> dict[str, Any]:
    """One row: build `in_flight` new composites, then serve requests spread over them."""
    mixtures = fresh.take(in_flight)
    s0 = prom.scrape(base_url)
    build_records = loadgen.run(base_url, _specs([SHORT_PROMPT], mixtures, 1), concurrency=in_flight)
    s1 = prom.scrape(base_url)
    records = loadgen.run(base_url, _specs(prompts, mixtures, config.scaling_output_tokens, config.scaling_requests),
                          concurrency=config.scaling_concurrency)
    s2 = prom.scrape(base_url)
    save(f"scaling-{in_flight}-build", build_records)
    save(f"scaling-{in_flight}", records)
    build, steady = prom.delta(s0, s1), prom.delta(s1, s2)
    summary = summarise(records)
    return {
        "in_flight": in_flight, "concurrency": config.scaling_concurrency, "requests": config.scaling_requests,
        "output_tokens": config.scaling_output_tokens,
        "new_composites": prom.total(build, "mode_cotd_composite_builds_total"),
        "build_ms": prom.histogram_summary(build, BUILD_HISTOGRAM, 1000.0),
        "new_mixture_ttft_ms": distribution((r.ttft_s for r in build_records if r.ok and r.ttft_s is not None), 1000.0),
        "build_failed": sum(not r.ok for r in build_records),
        "output_throughput_tok_s": summary["output_throughput_tok_s"],
        "request_throughput_rps": summary["request_throughput_rps"],
        "ttft_ms": summary["ttft_ms"], "tpot_ms": summary["tpot_ms"], "failed": summary["failed"],
        "errors": summary["errors"], "steady": _cache_counts(steady),
    }


def scaling_baseline(base_url: str, student_model: str, prompts: Sequence[Prompt], config: BenchConfig,
                     save: SaveRecords, name: str = "scaling-student") -> dict[str, Any]:
    """The scaling rows' load on the bare student (no adapter): what their throughput is compared with."""
    specs = [loadgen.RequestSpec(student_model, prompts[i % len(prompts)].text, config.scaling_output_tokens)
             for i in range(config.scaling_requests)]
    records = loadgen.run(base_url, specs, concurrency=config.scaling_concurrency)
    save(name, records)
    summary = summarise(records)
    return {"route": "student", "concurrency": config.scaling_concurrency, "requests": config.scaling_requests,
            "output_tokens": config.scaling_output_tokens,
            "output_throughput_tok_s": summary["output_throughput_tok_s"],
            "request_throughput_rps": summary["request_throughput_rps"],
            "ttft_ms": summary["ttft_ms"], "tpot_ms": summary["tpot_ms"], "failed": summary["failed"]}


def bracket(rows: list[dict[str, Any]], baselines: Sequence[dict[str, Any]]) -> None:
    """Give row i the mean student-route throughput of baselines i and i + 1, measured right before and right after
    it (`student_tok_s`, `student_around_tok_s`): each row is compared with the load next to it in time, so a slow
    drift of the machine or the server moves both sides of its ratio alike."""
    if len(baselines) != len(rows) + 1:
        raise ValueError(f"{len(rows)} scaling rows need {len(rows) + 1} student baselines, got {len(baselines)}")
    for row, before, after in zip(rows, baselines, baselines[1:], strict=False):
        around = [before.get("output_throughput_tok_s"), after.get("output_throughput_tok_s")]
        row["student_around_tok_s"] = around
        row["student_tok_s"] = None if None in around else sum(around) / 2


def new_vs_cached_ttft(base_url: str, pairs: int, fresh: FreshMixtures, save: SaveRecords) -> dict[str, Any]:
    """TTFT of a never-seen mixture against the same mixture right after, one request at a time, `pairs` times."""
    mixtures = fresh.take(pairs)
    specs = [spec for m in mixtures for spec in _specs([SHORT_PROMPT], [m], 1, 2)]  # new, then cached
    records = loadgen.run(base_url, specs, concurrency=1)
    save("new-vs-cached", records)
    new = distribution((r.ttft_s for r in records[0::2] if r.ok and r.ttft_s is not None), 1000.0)
    cached = distribution((r.ttft_s for r in records[1::2] if r.ok and r.ttft_s is not None), 1000.0)
    ratio = new["p50"] / cached["p50"] if new.get("p50") and cached.get("p50") else None
    return {"pairs": pairs, "new_ttft_ms": new, "cached_ttft_ms": cached, "ratio_p50": ratio,
            "failed": sum(not r.ok for r in records)}


def simulated_hit_rates(experts: Sequence[str], config: BenchConfig) -> list[dict[str, Any]]:
    """Offline LRU hit rate of the hit-rate workload at steady state, for the run's grid and coarser ones."""
    n, capacity = config.simulated_hit_rate_requests, cache_entries(config.serve_args)
    rows = []
    for grid in sorted({config.mixture_grid, 0.1, 0.25, 0.5}):
        try:
            size = len(grid_weights(config.mixture_k, grid))
        except ConfigError:
            continue
        keys = [mixture_key(m) for m in draw_mixtures(config.hit_rate_popularity, experts, config.mixture_k, grid, n,
                                                      config.seed + 5)]
        rows.append({"grid": grid, "pool": size * math.comb(len(experts), config.mixture_k), "requests": n,
                     "capacity": capacity, "hit_rate": lru_hit_rate(keys, capacity),
                     "ideal_hit_rate": 1 - len(set(keys)) / n if n else None})
    return rows
