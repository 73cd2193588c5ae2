"""Run by test_union_equivalence.py in a subprocess: one engine with the fast path, mixtures two ways.

The default bundle's experts are loaded and pinned under their member ids; then every prompt
runs, in one batch, (1) as a top-2 mixture id over the placeholder adapter (the union path) and
(2) as the same mixture's exact composite, written with mode_cotd.mixing.compose_exact, plus
(3) one expert by its member id and (4) the base. Prints the greedy token ids and top logprobs
of each as JSON on a RESULT line, with vLLM's compilation mode (MODE_COTD_LORA_COMPILE=1 compiles).
"""

import json
import sys
import tempfile
from pathlib import Path

MIXTURES = [{"gsm8k": 0.65, "last_letter_concatenation": 0.35}, {"aqua": 0.5, "gsm8k": 0.5},
            {"addsub": 0.8, "svamp": 0.2}]


def main(student: str, experts_dir: str, dtype: str) -> None:
    from greedy_check import PROMPTS, TOP_LOGPROBS, top_logprobs
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from mode_cotd.adapter import load_adapter, save_adapter
    from mode_cotd.mixing import compose_exact
    from mode_cotd.mixture import Mixture
    from serving.mixture_union import MixtureUnion
    from serving.protocol import AdapterSpec

    experts = {p.name: p for p in sorted(Path(experts_dir).iterdir()) if (p / "adapter_config.json").is_file()}
    work = Path(tempfile.mkdtemp())
    union = MixtureUnion.for_experts(experts, work, grid_units=20, max_lora_rank=16)
    llm = LLM(model=student, enable_lora=True, max_lora_rank=16, max_loras=len(experts) + 8, max_model_len=512,
              dtype=dtype, seed=0, kv_cache_memory_bytes=256 * 2**20)
    for member in union.members:
        assert llm.llm_engine.add_lora(LoRARequest(member.name, member.lora_id, member.path))
        assert llm.llm_engine.pin_lora(member.lora_id)
    requests, labels = [], []
    for m, weights in enumerate(MIXTURES):
        key = Mixture(tuple(weights), tuple(weights.values()))
        target = union.target(AdapterSpec(key))
        composite = work / f"composite-{m}"
        save_adapter(compose_exact([load_adapter(experts[n]) for n in key.experts], list(key.weights)), composite)
        for prompt in PROMPTS:
            requests += [(prompt, LoRARequest(target.name, target.lora_id, target.path)),
                         (prompt, LoRARequest(f"composite-{m}", 1000 + m, str(composite)))]
            labels += [f"union-{m}", f"composite-{m}"]
    expert = union.member("gsm8k")
    for prompt in PROMPTS:
        requests += [(prompt, LoRARequest(expert.name, expert.lora_id, expert.path)), (prompt, None)]
        labels += ["member-gsm8k", "base"]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=TOP_LOGPROBS)
    outputs = llm.generate([p for p, _ in requests], params, lora_request=[r for _, r in requests], use_tqdm=False)
    result = {"labels": labels, "tokens": [list(o.outputs[0].token_ids) for o in outputs],
              "texts": [o.outputs[0].text for o in outputs], "logprobs": [top_logprobs(o) for o in outputs],
              "compilation_mode": llm.llm_engine.vllm_config.compilation_config.mode.name}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(*sys.argv[1:4])
