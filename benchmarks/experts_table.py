"""The many-experts table: one `mode-cotd serve` per union size, its start time, memory and throughput.

For each E in `config.experts_table` (10, 100, 1,000 in a full run):
  - a bundle of E synthetic experts of the student's shape (benchmarks/synthetic_bundle.py: rank
    `config.experts_rank`, every linear module, a random top-2 gate over them), built once under
    `config.experts_cache` and reused by later runs;
  - `mode-cotd serve` on it in `config.experts_dtype`, its LoRA slots sized at the experts' rank: start-up
    time (process start to ready), and the memory of its whole process tree once ready (Ray, the Serve
    replicas, vLLM's engine core and worker: the sum of their proportional set sizes);
  - on that server, all under the scaling rows' load (`scaling_concurrency`, `scaling_requests`,
    `scaling_output_tokens`): the student route (no adapter), the gate route and, for each M in
    `config.experts_in_flight`, M distinct explicit top-2 mixtures over the E experts in flight, each as
    output tok/s and as a ratio to the student route on the same server;
  - the memory each expert added over the smallest union, against its estimate (serving/slot_memory.py: every
    pinned expert holds a slot of `max_lora_rank`, and vLLM keeps a host copy of its tensors).

Then, for each E in `config.experts_paged`, the same row with only `config.experts_resident` experts in slots
(`--engine-resident-experts`: the others paged in and out on demand, serving/expert_paging.py), with the
experts it paged in and out, and its gate throughput over the smallest union's (pinned) row.

Every mixture sums to 1 on the grid, so the union serves them all through mixture ids; the table records
how many requests it did (`union_requests`) and how many composites were built (should be 0).
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from benchmarks import loadgen, prom, servers
from benchmarks.config import BenchConfig
from benchmarks.prompts import Prompt
from benchmarks.scaling import scaling_baseline, scaling_row
from benchmarks.scenarios import SCENARIOS, request_specs
from benchmarks.stats import ratio, summarise
from benchmarks.synthetic_bundle import synthetic_bundle
from benchmarks.workloads import FreshMixtures, grid_weights
from mode_cotd.atomic import atomic_dir
from mode_cotd.student import resolve_student
from serving.slot_memory import adapter_bytes, slot_bytes

Echo = Callable[[str], None]


def expert_names(count: int) -> list[str]:
    """The synthetic experts' names, sortable: expert-0000 …"""
    return [f"expert-{i:04d}" for i in range(count)]


def cached_bundle(cache: Path, student: Path, count: int, rank: int, echo: Echo = print) -> Path:
    """The bundle of `count` synthetic experts of rank `rank` under `cache`, built (atomically) when missing."""
    folder = Path(cache) / f"synthetic-{count}-r{rank}"
    if (folder / "manifest.json").is_file():
        return folder
    echo(f"[bench] building {folder} ({count} experts, rank {rank})")
    with atomic_dir(folder) as staging:
        synthetic_bundle(staging, student, expert_names(count), rank)
    return folder


def distinct_mixtures(experts: Sequence[str], k: int, grid: float, n: int, seed: int) -> list[dict[str, float]]:
    """n distinct mixtures of k experts on the grid, drawn uniformly (no pool: a thousand experts have millions)."""
    rng, weights, seen, out = random.Random(seed), grid_weights(k, grid), set(), []
    while len(out) < n:
        names = sorted(rng.sample(list(experts), k))
        mixture = dict(zip(names, rng.choice(weights), strict=True))
        key = tuple(sorted(mixture.items()))
        if key not in seen:
            seen.add(key)
            out.append(mixture)
    return out


def tree_pss_bytes(pid: int) -> int:
    """Memory of a process and all its descendants, as their proportional set sizes (shared pages, such as the
    libraries every Ray worker maps, divided among the processes that share them, so the sum counts them once;
    processes that end meanwhile are skipped)."""
    total = 0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for process in processes:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


KV_CACHE_BYTES = 2**30
"""The KV cache of each server of the table, fixed: vLLM's CPU default (a share of the memory free at start) came out
negative for 1,000 experts once building their bundle had filled the page cache (2026-12-07), and the table's load
(64 requests of ~100 tokens) needs a few MB."""


def experts_row(count: int, bundle: Path, student: Path | None, config: BenchConfig, prompts: Sequence[Prompt],
                student_name: str, logs: Path, save: Callable, echo: Echo = print,
                resident: int | None = None) -> dict[str, Any]:
    """One row of the table: serve `bundle` (E = count experts; `resident` of them in slots, None: all), measure,
    stop."""
    folder = student or resolve_student(None)
    per_slot, copy = (f(folder, config.experts_rank, config.experts_dtype) for f in (slot_bytes, adapter_bytes))
    paged = resident is not None and resident < count
    label = f"{count}-paged" if paged else str(count)
    row: dict[str, Any] = {"experts": count, "resident": resident if paged else count, "rank": config.experts_rank,
                           "slot_mib": None if per_slot is None else round(per_slot / 2**20, 2),
                           "host_copy_mib": None if copy is None else round(copy / 2**20, 2)}
    with tempfile.TemporaryDirectory(prefix="mode-cotd-bench-composites-") as composites:
        # slots sized at the experts' own rank: every mixture of the table is served through the union, and a
        # thousand slots at the default k·r would need twice the memory (serving/slot_memory.py)
        spec = servers.mode_cotd_spec(Path(composites), bundle, student,
                                      ["--engine-dtype", config.experts_dtype, "--engine-max-lora-rank",
                                       str(config.experts_rank), "--engine-kv-cache-memory-bytes",
                                       str(KV_CACHE_BYTES),
                                       *(["--engine-resident-experts", str(resident)] if paged else []),
                                       *config.serve_args],
                                      prefix_caching=config.prefix_caching,
                                      stream_interval=config.stream_interval)
        spec.name = f"mode-cotd-{label}-experts"
        with servers.running(spec, logs) as srv:
            row["startup_s"] = round(srv.startup_s, 1)
            row["pss_gib"] = round(tree_pss_bytes(srv.process.pid) / 2**30, 2)
            echo(f"[bench] {label} experts: ready in {srv.startup_s:.0f} s, {row['pss_gib']} GiB (PSS of its processes)")
            first = prom.scrape(srv.base_url)
            row["student"] = scaling_baseline(srv.base_url, student_name, prompts, config,
                                              lambda name, r: save(f"experts-{label}-{name}", r))
            # the gate route under the student baseline's load (the scaling rows'), so the two compare
            n = config.scaling_requests
            specs = request_specs(SCENARIOS["e"], [prompts[i % len(prompts)] for i in range(n)],
                                  config.scaling_output_tokens, student_name, "")
            loadgen.run(srv.base_url, specs[: config.warmup_requests], concurrency=1)
            records = loadgen.run(srv.base_url, specs, concurrency=config.scaling_concurrency)
            save(f"experts-{label}-gate", records)
            row["gate"] = {"concurrency": config.scaling_concurrency, **summarise(records)}
            fresh = FreshMixtures(distinct_mixtures(expert_names(count), config.mixture_k, config.mixture_grid,
                                                    sum(config.experts_in_flight), config.seed + count))
            row["mixtures"] = [scaling_row(srv.base_url, m, prompts, config, fresh,
                                           lambda name, r: save(f"experts-{label}-{name}", r))
                               for m in config.experts_in_flight]
            session = prom.delta(first, prom.scrape(srv.base_url))
            row["union_requests"] = prom.total(session, "mode_cotd_mixture_union_requests_total")
            row["composite_builds"] = prom.total(session, "mode_cotd_composite_builds_total")
            if paged:  # gauges since the server started
                last = prom.scrape(srv.base_url)
                row["page_ins"] = prom.total(last, "mode_cotd_expert_page_ins")
                row["page_outs"] = prom.total(last, "mode_cotd_expert_page_outs")
    base = row["student"]["output_throughput_tok_s"]
    row["gate_vs_student"] = ratio(row["gate"]["output_throughput_tok_s"], base)
    for m in row["mixtures"]:
        m["vs_student"] = ratio(m["output_throughput_tok_s"], base)
    return row


def add_ratios(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Each row's gate throughput over the smallest union's (the target: >= 0.8 at 1,000 experts against 10), and
    its memory (PSS) per expert added since the smallest union (`pss_per_added_expert_mib`, against the slot
    estimate `slot_mib`)."""
    if not table or not table[0].get("gate"):
        return {}
    first = table[0]
    for r in table[1:]:
        added = r["experts"] - first["experts"]
        r["pss_per_added_expert_mib"] = round((r["pss_gib"] - first["pss_gib"]) * 1024 / added, 2) if added else None
    smallest = first["gate"]["output_throughput_tok_s"]
    return {str(r["experts"]): ratio((r.get("gate") or {}).get("output_throughput_tok_s"), smallest)
            for r in table}


def paged_ratios(table: dict[str, Any]) -> None:
    """Each paged row's gate throughput over the smallest pinned union's (`gate_vs_smallest`), in the row."""
    rows = table.get("rows") or []
    smallest = (rows[0].get("gate") or {}).get("output_throughput_tok_s") if rows else None
    for r in table.get("paged_rows") or []:
        r["gate_vs_smallest"] = ratio((r.get("gate") or {}).get("output_throughput_tok_s"), smallest)
