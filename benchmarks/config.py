"""What one benchmark run measures: a dataclass with a docstring per field, and the presets.

`PRESETS` is a plain table: `--quick` picks "quick" (under 10 minutes on a 2-core CPU), the
default is "full" (the dataclass defaults: about an hour there); a `mode-cotd bench` flag sets
most fields (its help is the field's docstring), checked as any settings (mode_cotd/settings.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from mode_cotd.errors import ConfigError
from mode_cotd.paths import REPO_ROOT
from mode_cotd.settings import settings_from_dict

ALL_SCENARIOS = "abcdefg"
DEFAULT_BUNDLE = REPO_ROOT / "bundles" / "default"


@dataclass
class BenchConfig:
    """One run: the scenarios, the load, and the scaling measurements."""

    scenarios: str = ALL_SCENARIOS
    """Which scenarios run (letters of a–g, see benchmarks/scenarios.py)."""
    output_tokens: int = 64
    """Output tokens of every request of a–g (`ignore_eos`: every request makes exactly this many)."""
    concurrencies: tuple[int, ...] = (1, 4, 16)
    """Closed-loop concurrency levels of the sweep (scenarios a–f)."""
    requests_per_level: int = 16
    """Requests per concurrency level (at least the concurrency itself)."""
    ratio_waves: int = 3
    """Waves of requests at the ratio concurrency (the highest): that level sends at least this many times the
    concurrency. One wave of 16 requests is one batch (~10 s here) whose throughput moved by ~10% between runs;
    the headline ratios are read there."""
    warmup_requests: int = 4
    """Short requests sent to a scenario before it is measured (compiles, loads its adapter)."""
    poisson_rates: tuple[float, ...] = (0.5, 1.0)
    """Open-loop Poisson arrival rates (requests/s) run on the gate route, after the sweep."""
    expert: str = "gsm8k"
    """The expert of scenarios b and d."""
    mixture_popularity: str = "distinct"
    """Popularity of scenario f's explicit mixtures: distinct, uniform, zipf:<a>, skewed or identical
    (benchmarks/workloads.py)."""
    mixture_k: int = 2
    """Experts per explicit mixture (scenario f, scaling, hit rate)."""
    mixture_grid: float = 0.05
    """Weight grid of explicit mixtures (a multiple of the gate's grid)."""
    peft_requests: int = 6
    """Requests of the transformers + peft baseline (one at a time)."""
    dtype: str = "float32"
    """Weights dtype of every scenario (`vllm serve --dtype`, `mode-cotd serve --engine-dtype`, the peft baseline).
    float32: the student's own bfloat16 is ~8x slower on CPUs without native bf16 (AVX2 only, like this one)."""
    scaling_in_flight: tuple[int, ...] = (1, 4, 16, 64)
    """Distinct mixtures in flight at once, one row of the scaling table each."""
    scaling_concurrency: int = 64
    """Requests in flight during each scaling row (spread round robin over its mixtures)."""
    scaling_requests: int = 128
    """Requests per scaling row (two waves at the default concurrency)."""
    scaling_output_tokens: int = 16
    """Output tokens per scaling request. Each row is compared with the student route measured right before and
    right after it (benchmarks/scaling.py: bracketed); 64 requests x 8 tokens (~10 s, mostly prefill) moved by
    ±10% between runs."""
    experts_table: tuple[int, ...] = (10, 100, 1000)
    """Union sizes of the many-experts table, one server each on a bundle of that many synthetic experts
    (benchmarks/experts_table.py); () skips it."""
    experts_paged: tuple[int, ...] = (1000,)
    """Union sizes served again with only `experts_resident` experts in LoRA slots, the others paged in on demand
    (serving/expert_paging.py): one more row each, after the table's; () skips them."""
    experts_resident: int = 128
    """Experts in slots in the paged rows (`mode-cotd serve --engine-resident-experts`): 128 holds the 64 top-2
    mixtures of the widest column at once."""
    experts_in_flight: tuple[int, ...] = (1, 16, 64)
    """Distinct explicit top-2 mixtures in flight, one column of the many-experts table each."""
    experts_rank: int = 8
    """Rank of the many-experts table's synthetic experts."""
    experts_dtype: str = "bfloat16"
    """The many-experts table's engine dtype: a thousand rank-8 experts pinned in float32 need ~21 GiB of slots and
    vLLM's host copies (serving/slot_memory.py), ~10 GiB in bfloat16."""
    experts_cache: str = str(Path.home() / ".cache" / "mode-cotd" / "bench")
    """Folder of the synthetic bundles, built once and reused (a thousand rank-8 experts take ~9 GB)."""
    hit_rate_popularity: str = "zipf:1.1"
    """Popularity of the composite-cache hit-rate workload (over all experts, k, grid)."""
    hit_rate_requests: int = 256
    """Requests of the hit-rate workload (short: `hit_rate_output_tokens` each; 0: skip it)."""
    hit_rate_concurrency: int = 16
    """Requests in flight during the hit-rate workload."""
    hit_rate_output_tokens: int = 2
    """Output tokens per hit-rate request."""
    new_vs_cached_pairs: int = 8
    """Pairs of one-at-a-time requests (a never-seen mixture, then the same again) for the new-vs-cached TTFT."""
    simulated_hit_rate_requests: int = 20000
    """Length of the offline LRU simulation of the same workload (steady state)."""
    cross_check: bool = True
    """Also run `vllm bench serve` against the gate route, as a check of our load generator."""
    student: str | None = None
    """Student folder (None: the default student)."""
    bundle: str = str(DEFAULT_BUNDLE)
    """Bundle served by mode-cotd (its experts also feed vLLM and the peft baseline)."""
    compile: bool = True
    """Serve mode-cotd with `--engine-compile` (its LoRA engine compiled, as `vllm serve` compiles scenario a's
    engine; vLLM never compiles a CPU LoRA engine, so b stays eager). Costs ~150 s more start-up here."""
    stream_interval: int = 4
    """Output tokens per streamed chunk in every server (`vllm serve --stream-interval`, `mode-cotd serve
    --engine-stream-interval`; mode-cotd's default is 4): the same chunking on both sides of each ratio."""
    prefix_caching: bool = False
    """vLLM's prefix caching in every server (`vllm serve --[no-]enable-prefix-caching`, `mode-cotd serve
    --[no-]engine-prefix-caching`). Off: every request computes its whole prompt, whatever ran before it, so
    scenarios and rows that reuse prompts do the same work. On, they hit the cache unevenly: a sweep's levels
    reuse the same prompts, the gate route's warm-up runs the very prompts and routes it then measures, and the
    scaling rows' student baseline reuses prompts the sweeps ran on the student route while each mixture row's
    fresh mixture ids start cold."""
    serve_args: list[str] = field(default_factory=list)
    """Extra `mode-cotd serve` flags (e.g. --no-engine-fast-lora)."""
    vllm_args: list[str] = field(default_factory=list)
    """Extra `vllm serve` flags."""
    seed: int = 0
    """Seed of prompt sampling, workloads and Poisson arrivals."""

    @property
    def ratio_concurrency(self) -> int:
        """The concurrency the headline ratios compare at: the highest of the sweep."""
        return max(self.concurrencies)

    def validate(self) -> None:
        """ConfigError naming a count that must be positive and is not."""
        for name in ("requests_per_level", "ratio_waves", "scaling_requests", "scaling_output_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"bench config {name}: expected a positive integer, got {getattr(self, name)}")

    def requests_at(self, concurrency: int) -> int:
        """Requests of the sweep's level at `concurrency` (requests_per_level, ratio_waves)."""
        waves = self.ratio_waves if concurrency == self.ratio_concurrency else 1
        return max(self.requests_per_level, waves * concurrency)


PRESETS: dict[str, BenchConfig] = {
    "full": BenchConfig(),
    "quick": BenchConfig(
        output_tokens=16, concurrencies=(8,), requests_per_level=8, ratio_waves=1, warmup_requests=2, peft_requests=3,
        scaling_in_flight=(1, 4, 16), scaling_concurrency=16, scaling_requests=16, scaling_output_tokens=4,
        hit_rate_requests=64, hit_rate_output_tokens=1, poisson_rates=(), new_vs_cached_pairs=4,
        experts_table=(), experts_paged=(), compile=False),  # a compiled engine starts ~2 min later: the quick run would pass 10 minutes
}
"""Named configurations; `mode-cotd bench --quick` runs "quick"."""


def preset(name: str, **overrides) -> BenchConfig:
    """A preset with some fields replaced (None: the preset's); ConfigError names unknown or mistyped ones."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return settings_from_dict(BenchConfig, {**asdict(PRESETS[name]), **given}, f"bench preset {name!r}")
