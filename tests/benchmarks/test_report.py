"""Ratios, the markdown report, the JSON and the plots, from a synthetic run (no servers)."""

from __future__ import annotations

import json
import math

from benchmarks import plots, report
from benchmarks.stats import RequestRecord, summarise


def _level(tok_s: float) -> dict:
    # one request of 100 tokens that took 100 / tok_s seconds
    wall = 100 / tok_s
    record = RequestRecord(index=0, start_s=0.0, end_s=wall, ttft_s=0.1, itl_s=[(wall - 0.1) / 99] * 99,
                           output_tokens=100, prompt_tokens=20)
    return summarise([record])


def fake_results() -> dict:
    throughput = {"a": 160.0, "b": 40.0, "c": 150.0, "d": 37.0, "e": 34.0, "f": 20.0}
    scenarios = {k: {"title": k, "levels": {"1": _level(v / 2), "8": _level(v)}} for k, v in throughput.items()}
    scenarios["g"] = {"title": "g", "levels": {"1": _level(3.0)}}
    return {
        "config": {"output_tokens": 100}, "environment": {"git_commit": "abc", "cpu": {}, "versions": {}},
        "student": {"name": "s"}, "ratio_concurrency": 8, "scenarios": scenarios, "servers": {"x": {"startup_s": 3.0}},
        "phases_s": {"total": 10.0}, "errors": {},
        "scaling": {
            "rows": [{"in_flight": m, "concurrency": 64, "output_throughput_tok_s": 30.0 / m, "ttft_ms": {"p50": 1.0},
                      "tpot_ms": {"p50": 2.0}, "new_composites": float(m),
                      "build_ms": {"p50": 40.0, "p99": 90.0}, "new_mixture_ttft_ms": {"p50": 300.0}, "failed": 0}
                     for m in (1, 4, 16, 64)],
            "composite_build_ms": {"n": 85, "mean": 45.0, "p50": 40.0, "p90": 80.0, "p99": 95.0},
            "hit_rate": {"popularity": "zipf:1.1", "experts": 10, "k": 2, "grid": 0.05, "requests": 100,
                         "distinct_mixtures": 40, "cache_hits": 60.0, "cache_misses": 40.0, "hit_rate": 0.6,
                         "ideal_hit_rate": 0.6, "capacity": 64},
            "simulated_hit_rate": [{"grid": 0.05, "pool": 855, "requests": 1000, "capacity": 64, "hit_rate": 0.5,
                                    "ideal_hit_rate": 0.6}],
        },
        "cross_check": {"concurrency": 8, "vllm_bench_serve": {"output_throughput_tok_s": 33.0, "ttft_ms": {"p50": 5.0},
                                                               "tpot_ms": {"p50": 2.0}},
                        "ours_output_throughput_tok_s": 34.0, "ratio_vllm_bench_vs_ours": 33 / 34},
        "open_loop": {"1": _level(10.0)},
    }


def test_ratios_compare_the_ratio_concurrency_and_the_baselines_only_level():
    results = report.add_ratios(fake_results())
    r = results["ratios"]
    assert set(r) == {"gate_vs_expert", "expert_vs_vllm_lora", "student_vs_vllm_base", "gate_vs_peft",
                      "gate_vs_student"}
    assert math.isclose(r["gate_vs_expert"], 34 / 37)
    assert math.isclose(r["expert_vs_vllm_lora"], 37 / 40)
    assert math.isclose(r["student_vs_vllm_base"], 150 / 160)
    assert math.isclose(r["gate_vs_peft"], 34 / 3)
    assert math.isclose(r["gate_vs_student"], 34 / 150)
    t = results["targets"]
    assert t["gate_vs_expert"]["met"] is True and t["gate_vs_peft"]["met"] is True
    assert t["gate_vs_student"]["met"] is None
    assert t["composite_hit_rate"]["met"] is False and t["composite_build_p50_ms"]["met"] is True


def test_missing_scenarios_give_null_ratios():
    results = fake_results()
    del results["scenarios"]["b"]
    results["errors"]["b"] = "ServerError: no"
    report.add_ratios(results)
    assert results["ratios"]["expert_vs_vllm_lora"] is None
    assert results["targets"]["expert_vs_vllm_lora"]["met"] is None
    assert "ServerError: no" in report.markdown(results)


def test_markdown_json_and_plots_are_written(tmp_path):
    results = report.add_ratios(fake_results())
    made = plots.write_all(results, tmp_path)
    json_path, md_path = report.write(results, tmp_path, "mode-cotd bench --quick")
    assert {p.name for p in made} == {"throughput_vs_concurrency.png", "latency_percentiles.png", "scaling.png"}
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in made)
    data = json.loads(json_path.read_text())
    assert math.isclose(data["ratios"]["gate_vs_expert"], 34 / 37)
    md = md_path.read_text()
    assert "Command: `mode-cotd bench --quick`" in md
    for heading in ("## Scenarios", "## Ratios and targets", "## Scaling", "## Composite cache hit rate",
                    "## Cross-check", "## Open loop"):
        assert heading in md
    assert md.count("\n| a |") == 2 and "| gate_vs_peft |" in md


def _experts_row(count: int, gate: float) -> dict:
    mixtures = [{"in_flight": m, "output_throughput_tok_s": gate - m / 10, "vs_student": (gate - m / 10) / 100}
                for m in (1, 16)]
    return {"experts": count, "rank": 8, "slot_mib": 11.0, "host_copy_mib": 9.3, "startup_s": 40.0 + count / 10, "pss_gib": 3.0 + count / 500,
            "student": {"output_throughput_tok_s": 100.0}, "gate": {"output_throughput_tok_s": gate},
            "gate_vs_student": gate / 100, "mixtures": mixtures, "union_requests": 48.0, "composite_builds": 0.0}


def test_the_many_experts_table_compares_the_largest_union_with_the_smallest():
    from benchmarks.experts_table import add_ratios as experts_ratios

    rows = [_experts_row(10, 90.0), _experts_row(100, 85.0), _experts_row(1000, 70.0)]
    results = {"scenarios": {}, "experts_table": {"rows": rows, "gate_vs_smallest": experts_ratios(rows)}}
    report.add_ratios(results)
    target = results["targets"]["gate_many_experts"]
    assert math.isclose(target["value"], 70 / 90) and target["met"] is False and target["target"] == 0.8
    text = report.markdown(results)
    assert "## Many experts" in text and "| 1000 | 1000 | 140 | 5.00 | 2.0 (11.0 + 9.3) | 100.0 | 70.0 (0.700) |" in text
    assert "16 mixtures in flight tok/s (/ student)" in text


def test_paged_rows_follow_the_pinned_ones_with_their_paging_counts():
    from benchmarks.experts_table import add_ratios as experts_ratios
    from benchmarks.experts_table import paged_ratios

    rows = [_experts_row(10, 90.0), _experts_row(1000, 70.0)]
    paged = {**_experts_row(1000, 45.0), "resident": 128, "page_ins": 300.0, "page_outs": 172.0, "startup_s": 50.0}
    table = {"rows": rows, "gate_vs_smallest": experts_ratios(rows), "paged_rows": [paged]}
    paged_ratios(table)
    assert math.isclose(paged["gate_vs_smallest"], 45 / 90)
    results = {"scenarios": {}, "experts_table": table}
    report.add_ratios(results)
    assert math.isclose(results["targets"]["gate_many_experts"]["value"], 70 / 90)  # the pinned rows' target
    lines = report.markdown(results).splitlines()
    pinned = next(i for i, line in enumerate(lines) if line.startswith("| 1000 | 1000 |"))
    assert lines[pinned + 1].startswith("| 1000 | 128 | 50 |") and lines[pinned + 1].endswith("| 300 / 172 | 0.500 |")
    assert lines[pinned].endswith("| - | 0.778 |")


def test_each_scaling_row_is_compared_with_the_student_route_around_it():
    from benchmarks.scaling import bracket

    results = fake_results()
    rows = results["scaling"]["rows"]  # 30, 7.5, 1.875, 0.46875 tok/s
    baselines = [{"output_throughput_tok_s": v} for v in (40.0, 20.0, 10.0, 2.5, 0.5)]
    bracket(rows, baselines)
    assert rows[0]["student_around_tok_s"] == [40.0, 20.0] and rows[0]["student_tok_s"] == 30.0
    results["scaling"]["student_baseline"] = {"concurrency": 64, "output_throughput_tok_s": 40.0,
                                              "ttft_ms": {"p50": 1.0}, "tpot_ms": {"p50": 2.0}, "failed": 0}
    report.add_ratios(results)
    per_row = results["targets"]["mixtures_vs_student"]["value"]
    assert per_row == {"1": 1.0, "4": 7.5 / 15.0, "16": 1.875 / 6.25, "64": 0.46875 / 1.5}  # not / the first (40)
    assert "| 1 | 64 | 30.0 | 40.0 / 20.0 |" in report.markdown(results)


def test_bracketing_needs_one_baseline_more_than_rows():
    import pytest

    from benchmarks.scaling import bracket

    with pytest.raises(ValueError, match="4 scaling rows need 5 student baselines, got 4"):
        bracket([{}] * 4, [{"output_throughput_tok_s": 1.0}] * 4)


def test_a_row_without_its_neighbours_falls_back_to_the_first_baseline():
    results = fake_results()
    results["scaling"]["student_baseline"] = {"output_throughput_tok_s": 60.0}
    report.add_ratios(results)
    assert results["targets"]["mixtures_vs_student"]["value"]["1"] == 0.5
