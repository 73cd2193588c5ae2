"""Run by test_forced_tokens.py in a subprocess (vLLM spawns workers: the __main__ guard).

One float32 engine with mode-cotd's forced-tokens logits processor, the tiny student and a LoRA. For each
sequence, the last FORCED tokens' log p two ways, under the LoRA and under none: (1) prompt_logprobs over the
whole sequence, (2) the sequence up to them as the prompt, forcing them (serving/forced_tokens.py), logprobs=0.
Prints both, and the emitted token ids, as JSON on a RESULT line.
"""

import json
import sys

FORCED = 4
SEQUENCES = [[5, 17, 99, 240, 31, 8, 77, 150, 3, 42], [11, 12, 13, 14, 200, 201, 9, 2, 60, 61, 62, 63]]


def main(student: str, adapter: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from serving.forced_tokens import FORCED_TOKENS_KEY, FQCN

    llm = LLM(model=student, enable_lora=True, max_lora_rank=8, max_loras=2, max_model_len=128, dtype="float32",
              seed=0, kv_cache_memory_bytes=32 * 2**20, enforce_eager=True, logits_processors=[FQCN])
    result = {}
    for label, lora in (("lora", LoRARequest("a", 1, adapter)), ("base", None)):
        whole = llm.generate([TokensPrompt(prompt_token_ids=s) for s in SEQUENCES],
                             SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                             lora_request=lora, use_tqdm=False)
        by_prompt = [[o.prompt_logprobs[i][s[i]].logprob for i in range(len(s) - FORCED, len(s))]
                     for o, s in zip(whole, SEQUENCES)]
        forced = [SamplingParams(max_tokens=FORCED, temperature=0.0, logprobs=0, ignore_eos=True,
                                 extra_args={FORCED_TOKENS_KEY: s[-FORCED:]}) for s in SEQUENCES]
        decoded = llm.generate([TokensPrompt(prompt_token_ids=s[:-FORCED]) for s in SEQUENCES], forced,
                               lora_request=lora, use_tqdm=False)
        result[label] = {
            "by_prompt": by_prompt,
            "forced": [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                       for o in decoded],
            "emitted": [list(o.outputs[0].token_ids) for o in decoded],
            "greedy": [list(o.outputs[0].token_ids) for o in llm.generate(
                [TokensPrompt(prompt_token_ids=s[:-FORCED]) for s in SEQUENCES],
                SamplingParams(max_tokens=FORCED, temperature=0.0, ignore_eos=True), lora_request=lora,
                use_tqdm=False)],
        }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
