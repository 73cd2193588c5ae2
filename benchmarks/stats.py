"""Per-request records and what they sum up to: throughput, TTFT, TPOT, ITL and latency percentiles.

Definitions (those of `vllm bench serve`):
- TTFT: request sent -> first chunk with a choice (a token delta; its text may be empty).
- ITL: the gaps between successive such chunks.
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1), per request with >= 2 output tokens.
- output throughput: output tokens of the successful requests / the run's wall time (first send
  to last response).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)
"""The percentiles every distribution reports."""


@dataclass
class RequestRecord:
    """One request as the client saw it (times in seconds on the client's monotonic clock)."""

    index: int
    """Position in the workload."""
    start_s: float
    """When it was sent."""
    end_s: float
    """When its last byte arrived (or it failed)."""
    ttft_s: float | None = None
    """Time to the first token chunk; None when none came."""
    itl_s: list[float] = field(default_factory=list)
    """Gaps between successive token chunks."""
    output_tokens: int = 0
    """Output tokens (the server's usage when it sent one, else the token chunks)."""
    prompt_tokens: int = 0
    """Prompt tokens (from the server's usage; 0 when unknown)."""
    error: str | None = None
    """Why it failed; None when it succeeded."""
    model: str = ""
    """The `model` it asked for."""
    mixture: dict[str, float] | None = None
    """The explicit mixture it sent, if any."""
    served: dict[str, Any] | None = None
    """The server's `mode_cotd` object (route, experts, adapter), when it sent one."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default); None if empty."""
    if not values:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values: Iterable[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """{n, mean, p50, p90, p99, max} of `values` times `scale` (e.g. 1000 for milliseconds)."""
    scaled = [v * scale for v in values]
    out: dict[str, float | int | None] = {"n": len(scaled),
                                          "mean": sum(scaled) / len(scaled) if scaled else None}
    for q in PERCENTILES:
        out[f"p{q:g}"] = percentile(scaled, q)
    out["max"] = max(scaled) if scaled else None
    return out


def summarise(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Throughput and latency figures of one run (latencies in ms, e2e in s)."""
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    if records:
        wall = max(r.end_s for r in records) - min(r.start_s for r in records)
    else:
        wall = 0.0
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)

    def rate(amount: float) -> float | None:
        return amount / wall if wall > 0 else None

    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(failed),
        "errors": sorted({r.error for r in failed if r.error})[:5],
        "duration_s": wall,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "request_throughput_rps": rate(len(done)),
        "output_throughput_tok_s": rate(output_tokens),
        "total_token_throughput_tok_s": rate(output_tokens + prompt_tokens),
        "ttft_ms": distribution((r.ttft_s for r in done if r.ttft_s is not None), 1000.0),
        "tpot_ms": distribution((t for r in done if (t := r.tpot_s) is not None), 1000.0),
        "itl_ms": distribution((gap for r in done for gap in r.itl_s), 1000.0),
        "e2e_s": distribution(r.e2e_s for r in done),
        "output_tokens_per_request": distribution(r.output_tokens for r in done),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator
