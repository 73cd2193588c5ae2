"""Every Prometheus metric of mode-cotd's server, created here, with unit-suffixed names.

The ingress owns them all: the router returns each batch's size and latency with its
decisions, and the student returns how it got each request's adapter (cache hit, miss,
build time, SVD error, evictions, LoRA slots in use) in the first event of the stream.
So one process records every series, however many router and student replicas run, and
GET /metrics on the app shows all `mode_cotd_*` series. Each `ServingMetrics` has its own
registry (tests build several in one process).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from serving.protocol import AdapterReport, GateDecision

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ERROR_BUCKETS = (1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0)


class ServingMetrics:
    """The server's metrics on one registry, and the few ways they are recorded."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "mode_cotd_requests", "HTTP API requests by route, endpoint and status code",
            ["route", "endpoint", "status"], registry=r)
        self.e2e_latency = Histogram(
            "mode_cotd_e2e_latency_seconds", "Arrival to last token of a successful request",
            ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "mode_cotd_time_to_first_token_seconds", "Arrival to first output token",
            ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(
            "mode_cotd_time_per_output_token_seconds", "Mean time per output token after the first",
            ["route"], buckets=TOKEN_TIME_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "mode_cotd_prompt_tokens", "Prompt tokens of served requests", ["route"], registry=r)
        self.output_tokens = Counter(
            "mode_cotd_output_tokens", "Output tokens generated", ["route"], registry=r)
        self.queue_depth = Gauge(
            "mode_cotd_queue_depth_requests",
            "Requests waiting or running: stage=ingress (in flight here), stage=engine (unfinished in vLLM)",
            ["stage"], registry=r)
        self.gate_latency = Histogram(
            "mode_cotd_gate_latency_seconds", "Time the gate took for one batch (featurise + gate)",
            buckets=LATENCY_BUCKETS, registry=r)
        self.gate_batch_size = Histogram(
            "mode_cotd_gate_batch_size_requests", "Prompts the gate scored together in one batch",
            buckets=BATCH_BUCKETS, registry=r)
        self.routed_weight = Histogram(
            "mode_cotd_routed_weight_ratio", "Weight the gate gave each expert it routed a prompt to",
            ["expert"], buckets=RATIO_BUCKETS, registry=r)
        self.cache_hits = Counter(
            "mode_cotd_composite_cache_hits", "Requests whose composite adapter was ready or being built", registry=r)
        self.cache_misses = Counter(
            "mode_cotd_composite_cache_misses", "Requests that had to build their composite adapter", registry=r)
        self.union_requests = Counter(
            "mode_cotd_mixture_union_requests",
            "Requests whose mixture the pinned experts served through a mixture id (no composite)", registry=r)
        self.cache_evictions = Counter(
            "mode_cotd_composite_cache_evictions", "Composites evicted from disk and vLLM's LoRA slots", registry=r)
        self.composite_builds = Counter(
            "mode_cotd_composite_builds", "Composite adapters built", registry=r)
        self.composite_build_time = Histogram(
            "mode_cotd_composite_build_seconds", "Time to compose, compress and write one composite",
            buckets=LATENCY_BUCKETS, registry=r)
        self.svd_error = Histogram(
            "mode_cotd_composite_svd_error_ratio", "Relative Frobenius error of composites SVD-compressed to fit",
            buckets=ERROR_BUCKETS, registry=r)
        self.lora_slots = Gauge(
            "mode_cotd_lora_slots_in_use_adapters", "Adapters loaded in vLLM, per student replica",
            ["replica"], registry=r)
        self.composite_build_failures = Counter(
            "mode_cotd_composite_build_failures", "Composite adapters that failed to build (reported, not cached)",
            registry=r)
        self.gate_fallbacks = Counter(
            "mode_cotd_gate_fallbacks", "Gate requests served by the fallback route, by reason (timeout, error)",
            ["reason"], registry=r)
        self.client_disconnects = Counter(
            "mode_cotd_client_disconnects", "Requests whose client went away before the end; generation aborted",
            ["stream"], registry=r)
        self.engine_unfinished = Gauge(
            "mode_cotd_engine_unfinished_requests",
            "Requests in vLLM (waiting or running) per student replica, read when /metrics is scraped",
            ["replica"], registry=r)
        self.paging = {key: Gauge(f"mode_cotd_{key}", text, ["replica"], registry=r) for key, text in (
            ("experts_resident", "Experts of the union in LoRA slots where they are paged, read at scrape time"),
            ("expert_page_ins", "Union experts loaded on demand since the replica started, read at scrape time"),
            ("expert_page_outs", "Union experts unloaded to make room since the replica started, read at scrape time"),
        )}
        self.student_open = Gauge(
            "mode_cotd_student_open_requests",
            "Requests a student replica holds (building an adapter, waiting or running), read at scrape time",
            ["replica"], registry=r)

    def record_gate(self, decision: GateDecision) -> None:
        """One gate decision; batch size and latency once per batch."""
        if decision.first_in_batch:
            self.gate_batch_size.observe(decision.batch_size)
            self.gate_latency.observe(decision.gate_seconds)
        for expert, weight in decision.mixture.as_dict().items():
            self.routed_weight.labels(expert).observe(weight)

    def record_adapter(self, report: AdapterReport, engine_queue_depth: int) -> None:
        """How the student got one request's adapter."""
        if report.outcome == "hit":
            self.cache_hits.inc()
        elif report.outcome == "miss":
            self.cache_misses.inc()
        elif report.outcome == "union":
            self.union_requests.inc()
        if report.build_seconds is not None:
            self.composite_builds.inc()
            self.composite_build_time.observe(report.build_seconds)
        if report.svd_error is not None:
            self.svd_error.observe(report.svd_error)
        if report.evictions:
            self.cache_evictions.inc(report.evictions)
        self.lora_slots.labels(report.replica or "0").set(report.lora_slots_in_use)
        self.queue_depth.labels("engine").set(engine_queue_depth)

    def record_success(self, route: str, prompt_tokens: int, output_tokens: int,
                       e2e_seconds: float, ttft_seconds: float | None) -> None:
        """Token counts and latencies of a finished request."""
        self.prompt_tokens.labels(route).inc(prompt_tokens)
        self.output_tokens.labels(route).inc(output_tokens)
        self.e2e_latency.labels(route).observe(e2e_seconds)
        if ttft_seconds is not None:
            self.ttft.labels(route).observe(ttft_seconds)
            if output_tokens > 1:
                self.tpot.labels(route).observe((e2e_seconds - ttft_seconds) / (output_tokens - 1))

    def record_student_stats(self, stats: dict) -> None:
        """A student replica's live counts (StudentService.stats), refreshed when /metrics is scraped."""
        replica = str(stats.get("replica") or "0")
        self.engine_unfinished.labels(replica).set(stats.get("engine_unfinished", 0))
        self.student_open.labels(replica).set(stats.get("open", 0))
        for key, gauge in self.paging.items():
            if key in stats:
                gauge.labels(replica).set(stats[key])

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text of every series, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
