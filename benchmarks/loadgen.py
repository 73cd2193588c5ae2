"""The load generator: streaming /v1/completions requests through the `openai` AsyncOpenAI client.

Two arrival modes:
- closed loop (`concurrency=C`): C workers, each sends its next request when its last one ends;
- open loop (`rate=λ`): request i is sent at the i-th arrival of a Poisson process of rate λ per
  second (exponential gaps, seeded), whatever is still in flight.

Every request streams (`stream_options.include_usage`), so the client times the first token and
each gap between tokens; output and prompt token counts come from the server's usage chunk.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.stats import RequestRecord


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload."""

    model: str
    """The `model` field (route)."""
    prompt: str
    """The prompt text."""
    max_tokens: int
    """Output tokens asked for."""
    mixture: dict[str, float] | None = None
    """mode-cotd's explicit `mixture` body field."""
    ignore_eos: bool = True
    """Ask the server to generate all `max_tokens` (vLLM's `ignore_eos`), so every scenario makes the same tokens."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """More body fields, sent as given."""

    def body_extras(self) -> dict[str, Any]:
        extras = dict(self.extra_body)
        if self.ignore_eos:
            extras["ignore_eos"] = True
        if self.mixture is not None:
            extras["mixture"] = self.mixture
        return extras


def client(base_url: str, timeout_s: float = 600.0, transport=None):
    """An AsyncOpenAI client for a server's /v1 (no retries: a failed request counts as failed).

    `transport`: a transport of the openai client's HTTP library in place of the network (tests mock it).
    Its default pool (1000 connections) is enough for every concurrency used here.
    """
    import openai

    http_client = None if transport is None else openai.DefaultAsyncHttpxClient(transport=transport)
    return openai.AsyncOpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key="none", max_retries=0,
                              timeout=timeout_s, http_client=http_client)


async def send(api, spec: RequestSpec, index: int, clock_zero: float) -> RequestRecord:
    """Send one streaming completion and time it (times relative to `clock_zero`)."""
    start = time.perf_counter()
    record = RequestRecord(index=index, start_s=start - clock_zero, end_s=start - clock_zero, model=spec.model,
                           mixture=spec.mixture)
    last_token_at: float | None = None
    token_chunks = 0
    usage = None
    try:
        stream = await api.completions.create(
            model=spec.model, prompt=spec.prompt, max_tokens=spec.max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=spec.body_extras() or None)
        async with stream:
            async for chunk in stream:
                now = time.perf_counter()
                extra = chunk.model_extra or {}
                if record.served is None and isinstance(extra.get("mode_cotd"), dict):
                    record.served = extra["mode_cotd"]
                if chunk.usage is not None:
                    usage = chunk.usage
                if chunk.choices:  # a token delta (its text may be empty: a partial UTF-8 character)
                    token_chunks += 1
                    if last_token_at is None:
                        record.ttft_s = now - start
                    else:
                        record.itl_s.append(now - last_token_at)
                    last_token_at = now
        if usage is not None:
            record.output_tokens, record.prompt_tokens = usage.completion_tokens, usage.prompt_tokens
        else:
            record.output_tokens = token_chunks
        if record.output_tokens == 0:
            record.error = "no output tokens"
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash of the run
        record.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    record.end_s = time.perf_counter() - clock_zero
    return record


async def closed_loop(base_url: str, specs: Sequence[RequestSpec], concurrency: int,
                      transport=None) -> list[RequestRecord]:
    """Send every spec with at most `concurrency` in flight; records in the specs' order."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    records: list[RequestRecord | None] = [None] * len(specs)
    next_index = iter(range(len(specs)))
    zero = time.perf_counter()
    async with client(base_url, transport=transport) as api:
        async def worker() -> None:
            for i in next_index:
                records[i] = await send(api, specs[i], i, zero)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(specs)))))
    return [r for r in records if r is not None]


def poisson_offsets(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (s from the start) of n Poisson arrivals at `rate` per second; all 0 for an infinite rate."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


async def open_loop(base_url: str, specs: Sequence[RequestSpec], rate: float, seed: int = 0,
                    transport=None) -> list[RequestRecord]:
    """Send spec i at the i-th Poisson arrival (rate per second), not waiting for earlier ones."""
    offsets = poisson_offsets(len(specs), rate, seed)
    zero = time.perf_counter()
    async with client(base_url, transport=transport) as api:
        async def at(i: int) -> RequestRecord:
            await asyncio.sleep(max(0.0, offsets[i] - (time.perf_counter() - zero)))
            return await send(api, specs[i], i, zero)

        return list(await asyncio.gather(*(at(i) for i in range(len(specs)))))


def run(base_url: str, specs: Sequence[RequestSpec], concurrency: int | None = None,
        rate: float | None = None, seed: int = 0, transport=None) -> list[RequestRecord]:
    """Closed loop when `concurrency` is given, else open loop at `rate` (exactly one of the two)."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency and rate")
    if concurrency is not None:
        return asyncio.run(closed_loop(base_url, specs, concurrency, transport))
    return asyncio.run(open_loop(base_url, specs, rate, seed, transport))
