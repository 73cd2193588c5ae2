"""Run by test_greedy_equivalence.py in a subprocess, once with the fast path on and once off.

vLLM picks its platform (and so its LoRA ops) once per process from MODE_COTD_FAST_LORA, so
each setting needs its own process; vLLM spawns workers, hence the __main__ guard. Prints the
punica wrapper in use and, for every request, the greedy token ids and each position's top
logprobs (token id -> logprob) as JSON on a RESULT line.
"""

import json
import sys

PROMPTS = [
    ("Q: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May?\nA:"),
    'Q: Take the last letters of each words in "Lucky Mireya Jj Kc" and concatenate them.\nA:',
    ("Q: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
     "How much did she earn?\nA:"),
]


TOP_LOGPROBS = 3


def top_logprobs(output) -> list[dict[int, float]]:
    return [{token: lp.logprob for token, lp in position.items()} for position in output.outputs[0].logprobs]


def main(student: str, expert_a: str, expert_b: str, dtype: str = "bfloat16") -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.platforms import current_platform

    llm = LLM(model=student, enable_lora=True, max_lora_rank=8, max_loras=4, max_model_len=512, dtype=dtype,
              seed=0, kv_cache_memory_bytes=256 * 2**20)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=TOP_LOGPROBS)
    a, b = LoRARequest("a", 1, expert_a), LoRARequest("b", 2, expert_b)
    one = llm.generate(PROMPTS, params, lora_request=[a] * len(PROMPTS), use_tqdm=False)
    # Two experts and the base in one batch, interleaved: each prompt with a, with b, with no adapter.
    batch = [prompt for prompt in PROMPTS for _ in range(3)]
    loras = [a, b, None] * len(PROMPTS)
    mixed = llm.generate(batch, params, lora_request=loras, use_tqdm=False)
    result = {
        "wrapper": current_platform.get_punica_wrapper(),
        "one_expert": [list(o.outputs[0].token_ids) for o in one],
        "mixed": [list(o.outputs[0].token_ids) for o in mixed],
        "mixed_text": [o.outputs[0].text for o in mixed],
        "one_expert_logprobs": [top_logprobs(o) for o in one],
        "mixed_logprobs": [top_logprobs(o) for o in mixed],
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
