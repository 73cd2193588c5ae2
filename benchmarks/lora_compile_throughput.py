"""Offline decode throughput of the default student, no adapter: vLLM without LoRA against a LoRA engine, eager
and compiled (`engine.compile`). One engine per process, one after the other:

    flock /tmp/heavy.lock .venv/bin/python benchmarks/lora_compile_throughput.py [--dtype float32]

Engines: "base" (LoRA off: vLLM compiles, Dynamo + Inductor), "lora-eager" (LoRA on, mode-cotd's grouped ops,
vLLM's CPU default: no compilation), "lora-compiled" (the same with MODE_COTD_LORA_COMPILE=1). Each runs one
warm-up, then 1 and 16 identical greedy requests of 64 tokens (`ignore_eos`), twice; prints one RESULT line
of JSON per engine (start-up seconds and output tok/s of each repeat).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from mode_cotd.student import resolve_student

ENGINES = {"base": {}, "lora-eager": {"MODE_COTD_LORA_COMPILE": "0"}, "lora-compiled": {"MODE_COTD_LORA_COMPILE": "1"}}
"""Engine name -> environment on top of this process's (MODE_COTD_FAST_LORA stays on)."""
PROMPT = "Question: Take the last letters of each word in 'Elon Musk Bill Gates' and concatenate them. Answer:"
TOKENS = 64


def measure(name: str, dtype: str) -> dict:
    """In a child process: start one engine, time its generations."""
    from vllm import LLM, SamplingParams

    kwargs = {"model": str(resolve_student()), "dtype": dtype, "max_model_len": 2048, "max_num_seqs": 64,
              "gpu_memory_utilization": 0.3, "seed": 0, "disable_log_stats": True}
    if name != "base":
        kwargs.update(enable_lora=True, max_loras=4, max_cpu_loras=16, max_lora_rank=16)
    started = time.monotonic()
    llm = LLM(**kwargs)
    result = {"engine": name, "dtype": dtype, "start_s": round(time.monotonic() - started, 1),
              "compilation_mode": llm.llm_engine.vllm_config.compilation_config.mode.name}
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True, temperature=0)
    for n in (1, 16):  # warm-up, every batch size
        llm.generate([PROMPT] * n, params, use_tqdm=False)
    for n in (1, 16, 1, 16):
        started = time.monotonic()
        llm.generate([PROMPT] * n, params, use_tqdm=False)
        result.setdefault(f"tok_s_{n}", []).append(round(n * TOKENS / (time.monotonic() - started), 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--engine", choices=sorted(ENGINES), help="(internal) measure this engine here")
    args = parser.parse_args()
    if args.engine:
        print("RESULT " + json.dumps(measure(args.engine, args.dtype)), flush=True)
        return
    for name, env in ENGINES.items():
        proc = subprocess.run([sys.executable, __file__, "--engine", name, "--dtype", args.dtype],
                              env={**os.environ, "VLLM_USE_AOT_COMPILE": "0", **env}, capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        print(lines[-1][len("RESULT "):] if lines else json.dumps({"engine": name, "error": proc.stderr[-2000:]}),
              flush=True)


if __name__ == "__main__":
    main()
