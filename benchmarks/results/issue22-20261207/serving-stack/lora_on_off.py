"""Offline vLLM, one process, compiled, float32: 16 prompts x 64 tokens with no adapter, the engine built with
enable_lora (mode-cotd's ops) or without; 4 rounds.  python lora_on_off.py lora|nolora"""

import json
import os
import sys
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main() -> None:
    from vllm import LLM, SamplingParams

    from mode_cotd.student import resolve_student
    from serving.fast_lora import plugin

    lora = sys.argv[1] == "lora"
    kw = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 10,
          "additional_config": plugin.engine_config(True, True)} if lora else {}
    llm = LLM(model=str(resolve_student()), dtype="float32", max_model_len=1024, gpu_memory_utilization=0.3, seed=0,
              enable_prefix_caching=False, **kw)
    lines = Path("benchmarks/results/full-20261207/prompts.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines][:16]
    sampling = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4), use_tqdm=False)
    for rnd in range(4):
        started = time.perf_counter()
        llm.generate(prompts, sampling, use_tqdm=False)
        print(f"{sys.argv[1]} round {rnd}: {16 * 64 / (time.perf_counter() - started):6.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
