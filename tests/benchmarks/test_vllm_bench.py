"""The `vllm bench serve` cross-check: its arguments parse with vLLM's own parser; its result maps to ours."""

from __future__ import annotations

import pytest

from benchmarks import vllm_bench


def test_cross_check_arguments_are_vllm_bench_serve_arguments(tmp_path):
    pytest.importorskip("vllm")
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = vllm_bench.cross_check_argv("http://127.0.0.1:1234", "mode-cotd", tmp_path / "student",
                                       tmp_path / "p.jsonl", 16, 32, 8, tmp_path, "r.json")
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(argv)
    assert args.backend == "openai" and args.base_url == "http://127.0.0.1:1234" and args.model == "mode-cotd"
    assert args.dataset_name == "custom" and args.skip_chat_template and args.ignore_eos
    assert args.custom_output_len == 32 and args.num_prompts == 16 and args.max_concurrency == 8
    assert args.save_result and args.result_filename == "r.json"


def test_summary_maps_vllm_bench_results():
    result = {"completed": 16, "failed": 0, "duration": 4.0, "total_output_tokens": 512, "request_throughput": 4.0,
              "output_throughput": 128.0, "mean_ttft_ms": 10.0, "p50_ttft_ms": 9.0, "p99_ttft_ms": 20.0,
              "p50_tpot_ms": 5.0, "p50_itl_ms": 5.0, "p50_e2el_ms": 200.0}
    s = vllm_bench.summary(result)
    assert s["output_throughput_tok_s"] == 128.0 and s["ttft_ms"]["p50"] == 9.0 and s["tpot_ms"]["p50"] == 5.0
    assert s["ttft_ms"]["p90"] is None
    assert vllm_bench.summary({"error": "x"}) == {"error": "x"}
