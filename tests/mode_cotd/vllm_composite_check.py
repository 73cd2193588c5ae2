"""Run by test_vllm_composite.py in a subprocess (vLLM spawns workers; this needs a __main__ guard).

Serves the converted default student in vLLM (enable_lora=True) with a two-expert exact
composite written by mode_cotd, and prints the greedy outputs of the base and the composite
as JSON on the last line.
"""

import json
import sys
from pathlib import Path


def main(student: str, composite: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=student,
        enable_lora=True,
        max_lora_rank=16,
        max_loras=1,
        max_model_len=512,
        dtype="bfloat16",
        seed=0,
        # An explicit KV cache size: on the CPU backend a memory fraction is the worker's whole budget (weights, and
        # compiled graphs, included), which a compiled float32 engine outgrew in CI.
        kv_cache_memory_bytes=256 * 2**20,
    )
    params = SamplingParams(temperature=0.0, max_tokens=24, min_tokens=16)  # the base may stop at once on a bare prompt
    prompts = [
        (
            "Infer the correct answer for the question.\n\nQ: Take the last letters of each words in "
            '"Lucky Mireya Jj Kc" and concatenate them.\nA:'
        )
    ]
    base = llm.generate(prompts, params)[0].outputs[0].text
    lora = LoRARequest("composite", 1, composite)
    mixed = llm.generate(prompts, params, lora_request=lora)[0].outputs[0].text
    mixed_again = llm.generate(prompts, params, lora_request=lora)[0].outputs[0].text
    print("RESULT " + json.dumps({"base": base, "composite": mixed, "composite_again": mixed_again}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], str(Path(sys.argv[2])))
