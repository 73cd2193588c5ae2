"""cProfile of offline vLLM (one process, eager, float32, mode-cotd's grouped LoRA ops): 16 prompts x 64 tokens,
all with one expert, then round robin over 8 experts. Run from the repository root:

    flock /tmp/heavy.lock .venv/bin/python benchmarks/results/profile-e-vs-d-20261127/offline-cprofile/prof_offline.py
"""

import cProfile
import json
import os
import pstats
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in this process, so cProfile sees them
EXPERTS = ["gsm8k", "aqua", "addsub", "svamp", "multiarith", "single_eq", "commonsense_qa", "date_understanding"]
PROMPTS = Path("benchmarks/results/full-20261127/prompts.jsonl")


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from mode_cotd.student import resolve_student
    from serving.fast_lora import plugin

    plugin.check(True)
    llm = LLM(model=str(resolve_student()), dtype="float32", enable_lora=True, max_lora_rank=8, max_loras=10,
              max_model_len=1024, enforce_eager=True, gpu_memory_utilization=0.3, seed=0)
    with PROMPTS.open() as f:
        prompts = [json.loads(line)["prompt"] for line in f][:16]
    sampling = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0)
    requests = {e: LoRARequest(e, i + 1, str(Path("bundles/default/experts") / e)) for i, e in enumerate(EXPERTS)}
    llm.generate(prompts[:2], sampling, lora_request=[requests[e] for e in EXPERTS[:2]])  # warm up
    for e in EXPERTS:  # load every adapter before the measured runs
        llm.generate(prompts[:1], SamplingParams(max_tokens=2), lora_request=requests[e])
    for name, loras in [("one", [requests["gsm8k"]] * 16), ("eight", [requests[EXPERTS[i % 8]] for i in range(16)])]:
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        llm.generate(prompts, sampling, lora_request=loras)
        profile.disable()
        seconds = time.perf_counter() - started
        print(f"== {name}: {16 * 64 / seconds:.1f} tok/s, {seconds:.1f} s", flush=True)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(
            r"fast_lora|lora/|punica|execute_model|_prepare|sample|forward", 25)


if __name__ == "__main__":
    main()
