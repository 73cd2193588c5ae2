"""One benchmark run, start to end, on one machine: one server at a time, then the baseline.

1. `vllm serve`, the student alone: scenario a.  2. `vllm serve --enable-lora` with one expert: b.
3. `mode-cotd serve` (a fresh composite cache in a temporary folder): the hit-rate workload first (cold cache), then
   c, d, e, f, the scaling rows, the open-loop rates, the `vllm bench serve` cross-check.
4. transformers + peft in this process: g, on the mixtures the gate chose for the same prompts in e.
A server that fails is recorded as the error of its scenarios; the run goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks import loadgen, peft_baseline, prom, servers, vllm_bench
from benchmarks.config import BenchConfig
from benchmarks.environment import describe
from benchmarks.experts_table import add_ratios as experts_ratios
from benchmarks.experts_table import cached_bundle, experts_row, paged_ratios
from benchmarks.prompts import Prompt, load_prompts, write_jsonl
from benchmarks.scaling import (
    bracket,
    hit_rate_phase,
    new_vs_cached_ttft,
    scaling_baseline,
    scaling_row,
    simulated_hit_rates,
)
from benchmarks.scenarios import GATE_MODEL, SCENARIOS, request_specs
from benchmarks.stats import RequestRecord, distribution, summarise
from benchmarks.workloads import FreshMixtures, draw_mixtures, mixture_pool
from mode_cotd.bundle import read_manifest, resolve_inside
from mode_cotd.student import resolve_student, student_identity


class Runner:
    """Runs `config`, writing records and logs under `output`; `results` is the JSON of the run.

    `prompts`: the prompts to send (default: `count` test-set prompts; tests pass short ones).
    """

    def __init__(self, config: BenchConfig, output: Path, echo: Callable[[str], None] = print,
                 prompts: Sequence[Prompt] | None = None):
        self.config, self.output, self.echo = config, output, echo
        self.logs = output / "logs"
        self.records_dir = output / "records"
        self.student = resolve_student(config.student)
        self.student_name = student_identity(self.student)["name"]
        self.bundle = Path(config.bundle)
        manifest = read_manifest(self.bundle)
        self.experts = sorted(manifest.experts)
        if config.expert not in manifest.experts:
            raise ValueError(f"expert {config.expert!r} is not in {self.bundle}; it has {', '.join(self.experts)}")
        self.expert_path = resolve_inside(self.bundle, manifest.experts[config.expert].path)
        self.pool = mixture_pool(self.experts, config.mixture_k, config.mixture_grid, config.seed)
        self.fresh = FreshMixtures(self.pool)
        count = max(config.requests_at(config.ratio_concurrency), config.peft_requests,
                    config.scaling_requests, config.hit_rate_requests, config.warmup_requests)
        self.prompts: list[Prompt] = list(prompts) if prompts else load_prompts(count, seed=config.seed)
        self.gate_mixtures: list[dict[str, float] | None] = []
        self.results: dict[str, Any] = {
            "config": dataclasses.asdict(config), "environment": describe(),
            "student": {"path": str(self.student), "name": self.student_name},
            "ratio_concurrency": config.ratio_concurrency,
            "servers": {}, "scenarios": {}, "open_loop": {}, "scaling": {}, "cross_check": None,
            "phases_s": {}, "errors": {},
        }

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        self.echo(f"[bench] {name}...")
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - one failed phase is recorded, the others still run
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.echo(f"[bench] {name} failed: {type(exc).__name__}: {exc}")
            (self.logs / f"error-{name}.txt").parent.mkdir(parents=True, exist_ok=True)
            (self.logs / f"error-{name}.txt").write_text(traceback.format_exc())
        finally:
            self.results["phases_s"][name] = round(time.monotonic() - started, 1)
            self.echo(f"[bench] {name}: {time.monotonic() - started:.0f} s")

    def save_records(self, name: str, records: Sequence[RequestRecord]) -> None:
        self.records_dir.mkdir(parents=True, exist_ok=True)
        with (self.records_dir / f"{name}.jsonl").open("w") as f:
            for r in records:
                f.write(json.dumps(r.to_dict()) + "\n")

    def server(self, spec: servers.ServerSpec) -> contextlib.AbstractContextManager[servers.RunningServer]:
        @contextlib.contextmanager
        def started() -> Iterator[servers.RunningServer]:
            with servers.running(spec, self.logs) as server:
                self.results["servers"][spec.name] = {"startup_s": round(server.startup_s, 1),
                                                      "argv": spec.argv, "log": str(server.log_path)}
                self.echo(f"[bench] {spec.name} ready in {server.startup_s:.0f} s")
                yield server
        return started()

    def first(self, n: int) -> list[Prompt]:
        """The first n prompts (cycling when fewer were given)."""
        return [self.prompts[i % len(self.prompts)] for i in range(n)]

    def sweep(self, key: str, base_url: str) -> list[RequestRecord]:
        """Closed-loop levels of one scenario; returns the records of the ratio concurrency's level.

        Warm-up first: a few short requests (compiles, loads the expert); for the gate route, every
        prompt of the sweep once with 1 token, so the gate's composites are built before the clock
        starts (steady state; scenario f measures new composites). Scenario f draws its mixtures per
        level, fresh ones for "distinct", and has no warm-up.
        """
        config, scenario = self.config, SCENARIOS[key]
        largest = max(config.requests_at(c) for c in config.concurrencies)

        def specs(n: int, max_tokens: int):
            mixtures = self.mixtures_for_f(n) if scenario.route == "mixtures" else None
            return request_specs(scenario, self.first(n), max_tokens, self.student_name, config.expert, mixtures)

        if scenario.route == "gate":
            loadgen.run(base_url, specs(largest, 1), concurrency=config.ratio_concurrency)
        elif scenario.route != "mixtures" and config.warmup_requests:
            loadgen.run(base_url, specs(config.warmup_requests, 4), concurrency=config.warmup_requests)
        levels, at_ratio = {}, []
        for concurrency in config.concurrencies:
            records = loadgen.run(base_url, specs(config.requests_at(concurrency), config.output_tokens),
                                  concurrency=concurrency)
            self.save_records(f"{key}-c{concurrency}", records)
            levels[str(concurrency)] = s = summarise(records)
            if concurrency == config.ratio_concurrency:
                at_ratio = records
            self.echo(f"[bench]   {key} c={concurrency}: {s['output_throughput_tok_s'] or 0:.1f} tok/s, "
                      f"TTFT p50 {s['ttft_ms']['p50'] or 0:.0f} ms, failed {s['failed']}")
        self.results["scenarios"][key] = {"title": scenario.title, "server": scenario.server, "route": scenario.route,
                                          "levels": levels}
        return at_ratio

    def mixtures_for_f(self, n: int) -> list[dict[str, float]]:
        if self.config.mixture_popularity == "distinct":
            return self.fresh.take(n)
        return draw_mixtures(self.config.mixture_popularity, self.experts, self.config.mixture_k,
                             self.config.mixture_grid, n, self.config.seed + 7)

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        config, wanted = self.config, set(self.config.scenarios)
        started = time.monotonic()
        self.output.mkdir(parents=True, exist_ok=True)
        if "a" in wanted:
            spec = servers.vllm_spec(self.student, self.student_name, dtype=config.dtype, extra_args=config.vllm_args,
                                     prefix_caching=config.prefix_caching,
                                     stream_interval=config.stream_interval)
            with self.phase("a"), self.server(spec) as srv:
                self.sweep("a", srv.base_url)
        if "b" in wanted:
            spec = servers.vllm_spec(self.student, self.student_name, {config.expert: self.expert_path},
                                     dtype=config.dtype, extra_args=config.vllm_args,
                                     prefix_caching=config.prefix_caching,
                                     stream_interval=config.stream_interval)
            with self.phase("b"), self.server(spec) as srv:
                self.sweep("b", srv.base_url)
        if wanted & set("cdef") or config.scaling_in_flight or config.hit_rate_requests:
            with self.phase("mode-cotd"):
                self.mode_cotd_session(wanted)
        if "g" in wanted:
            with self.phase("g"):
                self.peft_scenario()
        if config.experts_table or config.experts_paged:
            self.many_experts()
        self.results["phases_s"]["total"] = round(time.monotonic() - started, 1)
        return self.results

    def mode_cotd_session(self, wanted: set[str]) -> None:
        config = self.config
        composites = tempfile.TemporaryDirectory(prefix="mode-cotd-bench-composites-")  # ~10 MB each: not kept
        spec = servers.mode_cotd_spec(Path(composites.name), self.bundle,
                                      self.student if config.student else None,
                                      ["--engine-dtype", config.dtype,
                                       *(["--engine-compile"] if config.compile else []), *config.serve_args],
                                      prefix_caching=config.prefix_caching,
                                      stream_interval=config.stream_interval)
        with composites, self.server(spec) as srv:
            first = prom.scrape(srv.base_url)
            if config.hit_rate_requests:
                with self.phase("hit-rate"):
                    self.results["scaling"]["hit_rate"] = hit_rate_phase(
                        srv.base_url, self.prompts, self.experts, config, self.fresh, self.save_records)
            for key in "cde":
                if key in wanted:
                    with self.phase(key):
                        records = self.sweep(key, srv.base_url)
                        if key == "e":
                            self.gate_mixtures = [(r.served or {}).get("experts") for r in records]
                            self.fresh.mark_used(m for m in self.gate_mixtures if m)
            if "f" in wanted:
                with self.phase("f"):
                    self.sweep("f", srv.base_url)
            if config.new_vs_cached_pairs:
                with self.phase("new-vs-cached"):
                    self.results["scaling"]["new_vs_cached"] = new_vs_cached_ttft(
                        srv.base_url, config.new_vs_cached_pairs, self.fresh, self.save_records)
            if config.scaling_in_flight:
                self.scaling_rows(srv.base_url)
            for rate in config.poisson_rates:
                with self.phase(f"poisson-{rate:g}"):
                    n = config.requests_per_level
                    specs = request_specs(SCENARIOS["e"], self.first(n), config.output_tokens,
                                          self.student_name, config.expert)
                    records = loadgen.run(srv.base_url, specs, rate=rate, seed=config.seed)
                    self.save_records(f"poisson-{rate:g}", records)
                    self.results["open_loop"][f"{rate:g}"] = {"route": "gate", **summarise(records)}
            if config.cross_check and "e" in wanted:
                with self.phase("cross-check"):
                    self.cross_check(srv.base_url)
            last = prom.scrape(srv.base_url)
            session = prom.delta(first, last)
            self.results["scaling"]["composite_build_ms"] = prom.histogram_summary(
                session, "mode_cotd_composite_build_seconds", 1000.0)
            self.results["scaling"]["session_cache"] = {
                name: prom.total(session, f"mode_cotd_composite_{name}_total")
                for name in ("cache_hits", "cache_misses", "builds", "cache_evictions")}
            self.results["scaling"]["session_cache"]["union_requests"] = prom.total(
                session, "mode_cotd_mixture_union_requests_total")
        self.results["scaling"]["simulated_hit_rate"] = simulated_hit_rates(self.experts, config)

    def scaling_rows(self, base_url: str) -> None:
        """The scaling rows, each between two runs of its load on the student route (scaling.bracket)."""
        config, scaling = self.config, self.results["scaling"]

        def baseline(i: int) -> dict[str, Any]:
            name = "scaling-student" if i == 0 else f"scaling-student-{i}"
            with self.phase(name):
                return scaling_baseline(base_url, self.student_name, self.prompts, config, self.save_records, name)

        baselines, rows = [baseline(0)], scaling.setdefault("rows", [])
        for i, in_flight in enumerate(config.scaling_in_flight, start=1):
            with self.phase(f"scaling-{in_flight}"):
                rows.append(scaling_row(base_url, in_flight, self.prompts, config, self.fresh, self.save_records))
            baselines.append(baseline(i))
        bracket(rows, baselines)
        scaling["student_baseline"] = baselines[0]
        scaling["student_baselines_tok_s"] = [b["output_throughput_tok_s"] for b in baselines]

    def many_experts(self) -> None:
        """The many-experts table (benchmarks/experts_table.py): one server per union size, smallest first."""
        config, table = self.config, self.results.setdefault("experts_table", {"rows": []})
        for count in sorted(config.experts_table):
            with self.phase(f"experts-{count}"):
                bundle = cached_bundle(Path(config.experts_cache).expanduser(), self.student, count,
                                       config.experts_rank, self.echo)
                table["rows"].append(experts_row(count, bundle, self.student if config.student else None, config,
                                                 self.prompts, self.student_name, self.logs, self.save_records,
                                                 self.echo))
        table["gate_vs_smallest"] = experts_ratios(table["rows"])
        for count in sorted(config.experts_paged):
            with self.phase(f"experts-{count}-paged"):
                bundle = cached_bundle(Path(config.experts_cache).expanduser(), self.student, count,
                                       config.experts_rank, self.echo)
                row = experts_row(count, bundle, self.student if config.student else None, config, self.prompts,
                                  self.student_name, self.logs, self.save_records, self.echo,
                                  resident=config.experts_resident)
                table.setdefault("paged_rows", []).append(row)
        paged_ratios(table)

    def cross_check(self, base_url: str) -> None:
        config = self.config
        n = max(config.requests_per_level, config.ratio_concurrency)
        dataset = write_jsonl(self.first(n), self.output / "prompts.jsonl")
        result_file = "vllm-bench-serve.json"
        argv = vllm_bench.cross_check_argv(base_url, GATE_MODEL, self.student, dataset, n, config.output_tokens,
                                           config.ratio_concurrency, self.output, result_file)
        result = vllm_bench.run_cross_check(argv, self.output / result_file, self.logs / "vllm-bench-serve.log")
        ours = self.results["scenarios"].get("e", {}).get("levels", {}).get(str(config.ratio_concurrency), {})
        theirs = vllm_bench.summary(result)
        self.results["cross_check"] = {
            "command": "vllm bench serve " + " ".join(argv), "route": "gate", "concurrency": config.ratio_concurrency,
            "vllm_bench_serve": theirs,
            "ours_output_throughput_tok_s": ours.get("output_throughput_tok_s"),
            "ratio_vllm_bench_vs_ours": _ratio(theirs.get("output_throughput_tok_s"),
                                               ours.get("output_throughput_tok_s")),
        }

    def peft_scenario(self) -> None:
        config = self.config
        n = config.peft_requests
        fallback = draw_mixtures("uniform", self.experts, config.mixture_k, config.mixture_grid, n, config.seed + 11)
        mixtures = [(self.gate_mixtures[i] if i < len(self.gate_mixtures) and self.gate_mixtures[i] else fallback[i])
                    for i in range(n)]
        requests = [peft_baseline.PeftRequest(p.text, m) for p, m in zip(self.first(n), mixtures, strict=False)]
        load_started = time.monotonic()
        model, tokenizer = peft_baseline.load(self.student, self.bundle, config.dtype)
        load_s = time.monotonic() - load_started
        peft_baseline.run(model, tokenizer, requests[:1], 2)  # warm-up
        records, compose_s = peft_baseline.run(model, tokenizer, requests, config.output_tokens)
        self.save_records("g-c1", records)
        summary = summarise(records)
        self.echo(f"[bench]   g c=1: {summary['output_throughput_tok_s'] or 0:.1f} tok/s")
        self.results["scenarios"]["g"] = {
            "title": SCENARIOS["g"].title, "server": "peft", "route": "mixtures", "levels": {"1": summary},
            "load_s": round(load_s, 1), "compose_ms": distribution(compose_s, 1000.0),
            "mixtures_from": "gate (scenario e)" if any(self.gate_mixtures) else "uniform draw",
            "dtype": config.dtype, **peft_baseline.environment()}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
