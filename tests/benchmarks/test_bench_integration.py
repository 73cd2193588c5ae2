"""A tiny `mode-cotd bench` against a real `mode-cotd serve` (tiny student, tiny bundle): c–f, scaling, hit
rate, the `vllm bench serve` cross-check and the many-experts table (servers on 2 and 70 synthetic experts: a
dense and a sparse union), then the report. About 5 minutes on 2 CPU cores."""

from __future__ import annotations

import json

import pytest

from benchmarks import plots, report
from benchmarks.config import BenchConfig
from benchmarks.prompts import Prompt
from benchmarks.runner import Runner

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.ray]

SERVE_ARGS = ["--engine-max-model-len", "512", "--engine-enforce-eager", "--engine-kv-cache-memory-bytes",
              str(64 * 2**20), "--engine-max-num-seqs", "16", "--ray-num-cpus", "2", "--startup-timeout-s", "420"]


def test_a_tiny_bench_against_a_real_server(tiny_student, bench_bundle, tmp_path, heavy_lock):
    config = BenchConfig(
        scenarios="cdef", output_tokens=5, concurrencies=(3,), requests_per_level=6, warmup_requests=1,
        expert="alpha", mixture_k=2, mixture_grid=0.05, scaling_in_flight=(1, 3), scaling_concurrency=3,
        scaling_requests=6, scaling_output_tokens=2, hit_rate_requests=12, hit_rate_concurrency=4,
        hit_rate_output_tokens=1, simulated_hit_rate_requests=500, poisson_rates=(4.0,), student=str(tiny_student),
        bundle=str(bench_bundle), serve_args=SERVE_ARGS, experts_table=(2, 70), experts_in_flight=(1, 3),
        experts_rank=4, experts_cache=str(tmp_path / "synthetic"))
    prompts = [Prompt("t", f"Q: what is {i} plus {i}?\nA:") for i in range(12)]
    results = Runner(config, tmp_path, prompts=prompts).run()
    assert results["errors"] == {}, results["errors"]

    n = config.requests_at(3)  # the ratio level: ratio_waves (3) waves of 3
    assert n == 9
    for key, route in (("c", "base"), ("d", "expert"), ("e", "gate"), ("f", "mixture")):
        level = results["scenarios"][key]["levels"]["3"]
        assert level["completed"] == n and level["failed"] == 0, (key, level)
        assert level["output_tokens"] == n * 5, key  # ignore_eos: exactly 5 tokens each
        records = [json.loads(line) for line in (tmp_path / "records" / f"{key}-c3.jsonl").read_text().splitlines()]
        assert {r["served"]["route"] for r in records} == {route}, key
    f_records = [json.loads(line) for line in (tmp_path / "records" / "f-c3.jsonl").read_text().splitlines()]
    assert len({json.dumps(r["mixture"], sort_keys=True) for r in f_records}) == n  # distinct weight vectors

    rows = results["scaling"]["rows"]
    assert [r["in_flight"] for r in rows] == [1, 3]
    # the mixtures sum to 1 on the grid: the union serves them all, nothing is built
    assert [r["new_composites"] for r in rows] == [0, 0] and all(r["failed"] == 0 for r in rows)
    assert [r["steady"]["union_requests"] for r in rows] == [6, 6]
    assert results["scaling"]["session_cache"]["builds"] == 0
    base = results["scaling"]["student_baseline"]
    assert base["failed"] == 0 and base["output_throughput_tok_s"] > 0
    around = results["scaling"]["student_baselines_tok_s"]  # before row 1, between the rows, after row 3
    assert len(around) == 3 and all(v > 0 for v in around)
    assert [r["student_around_tok_s"] for r in rows] == [around[:2], around[1:]]
    assert (tmp_path / "records" / "scaling-student-2.jsonl").is_file()
    hit = results["scaling"]["hit_rate"]
    assert hit["union_requests"] == 12 and hit["cache_hits"] + hit["cache_misses"] == 0 and hit["hit_rate"] == 1
    new_vs_cached = results["scaling"]["new_vs_cached"]
    assert new_vs_cached["failed"] == 0 and new_vs_cached["ratio_p50"] > 0
    assert results["scaling"]["simulated_hit_rate"]

    cross = results["cross_check"]
    assert "error" not in cross["vllm_bench_serve"], cross
    assert cross["vllm_bench_serve"]["completed"] == 6 and cross["vllm_bench_serve"]["output_tokens"] == 30

    # the many-experts table: a dense union of 2 and a sparse one of 70, every mixture through the union
    table = results["experts_table"]
    assert [r["experts"] for r in table["rows"]] == [2, 70]
    for row in table["rows"]:
        assert row["startup_s"] > 0 and row["pss_gib"] > 0.1 and row["composite_builds"] == 0, row
        assert row["gate"]["completed"] == 6 and row["gate"]["failed"] == 0, row["gate"]
        assert [m["in_flight"] for m in row["mixtures"]] == [1, 3] and all(m["failed"] == 0 for m in row["mixtures"])
        assert row["union_requests"] >= (1 + 6) + (3 + 6), row  # each mixture row: its builds and its requests
        assert row["student"]["failed"] == 0 and row["gate_vs_student"] > 0
    assert table["gate_vs_smallest"]["2"] == 1.0 and table["gate_vs_smallest"]["70"] > 0

    report.add_ratios(results)
    assert results["targets"]["gate_many_experts"]["value"] == table["gate_vs_smallest"]["70"]
    assert results["ratios"]["gate_vs_expert"] is not None and results["ratios"]["gate_vs_student"] is not None
    assert results["ratios"]["student_vs_vllm_base"] is None  # a was not run
    assert results["targets"]["composite_build_p50_ms"]["value"] == 0.0  # nothing built
    assert set(results["targets"]["mixtures_vs_student"]["value"]) == {"1", "3"}
    assert sorted(p.name for p in plots.write_all(results, tmp_path)) == [
        "latency_percentiles.png", "many_experts.png", "scaling.png", "throughput_vs_concurrency.png"]
    report.write(results, tmp_path, "test")
    print(json.dumps({"phases_s": results["phases_s"], "ratios": results["ratios"]}))
