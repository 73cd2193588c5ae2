"""Run by test_union_equivalence.py in a subprocess: one engine with the fast path, mixtures two ways.

The default bundle's experts are loaded and pinned under their member ids; then every prompt
runs, in one batch, (1) as a top-2 mixture id over the placeholder adapter (the union path) and
(2) as the same mixture's exact composite, written with mode_cotd.mixing.compose_exact, plus
(3) one expert by its member id and (4) the base. A second union over the same experts takes
SHARED as its shared adapter (weight 1 under every mixture id, serving/mixture_union.py), and
each mixture also runs (5) as its mixture id and (6) as the composite of mixture + SHARED, in a
second batch (the fast path serves one union's mixture ids per step). Prints the greedy token ids and top logprobs
of each as JSON on a RESULT line, with vLLM's compilation mode (MODE_COTD_LORA_COMPILE=1 compiles).
"""

import json
import sys
import tempfile
from pathlib import Path

SHARED = "tracking_shuffled_objects"
"""Stands in for a shared adapter in the second union (no mixture below uses it)."""
MIXTURES = [{"gsm8k": 0.65, "last_letter_concatenation": 0.35}, {"aqua": 0.5, "gsm8k": 0.5},
            {"addsub": 0.8, "svamp": 0.2}]


def main(student: str, experts_dir: str, dtype: str) -> None:
    from greedy_check import PROMPTS, TOP_LOGPROBS, top_logprobs
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from mode_cotd.adapter import load_adapter, save_adapter
    from mode_cotd.mixing import compose_exact
    from mode_cotd.mixture import Mixture
    from mode_cotd.routes import with_shared
    from serving.mixture_union import MixtureUnion
    from serving.protocol import AdapterSpec

    experts = {p.name: p for p in sorted(Path(experts_dir).iterdir()) if (p / "adapter_config.json").is_file()}
    work = Path(tempfile.mkdtemp())
    union = MixtureUnion.for_experts(experts, work, grid_units=20, max_lora_rank=32)
    shared = MixtureUnion.for_experts(experts, work, grid_units=20, max_lora_rank=32, shared=SHARED)
    llm = LLM(model=student, enable_lora=True, max_lora_rank=32, max_loras=2 * len(experts) + 12, max_model_len=512,
              dtype=dtype, seed=0, kv_cache_memory_bytes=256 * 2**20)
    for member in union.members + shared.members:
        assert llm.llm_engine.add_lora(LoRARequest(member.name, member.lora_id, member.path))
        assert llm.llm_engine.pin_lora(member.lora_id)
    requests, labels, over_shared, shared_labels = [], [], [], []
    for m, weights in enumerate(MIXTURES):
        key = Mixture(tuple(weights), tuple(weights.values()))
        target = union.target(AdapterSpec(key))
        composite = work / f"composite-{m}"
        save_adapter(compose_exact([load_adapter(experts[n]) for n in key.experts], list(key.weights)), composite)
        over = with_shared(key, SHARED)
        shared_target = shared.target(AdapterSpec(over))
        shared_composite = work / f"shared-composite-{m}"
        save_adapter(compose_exact([load_adapter(experts[n]) for n in over.experts], list(over.weights)),
                     shared_composite)
        for prompt in PROMPTS:
            requests += [(prompt, LoRARequest(target.name, target.lora_id, target.path)),
                         (prompt, LoRARequest(f"composite-{m}", 1000 + m, str(composite)))]
            labels += [f"union-{m}", f"composite-{m}"]
            over_shared += [(prompt, LoRARequest("shared-" + shared_target.name, shared_target.lora_id,
                                                 shared_target.path)),
                            (prompt, LoRARequest(f"shared-composite-{m}", 2000 + m, str(shared_composite)))]
            shared_labels += [f"shared-union-{m}", f"shared-composite-{m}"]
    expert = union.member("gsm8k")
    for prompt in PROMPTS:
        requests += [(prompt, LoRARequest(expert.name, expert.lora_id, expert.path)), (prompt, None)]
        labels += ["member-gsm8k", "base"]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=TOP_LOGPROBS)
    # One batch per union: the fast path serves mixture ids of one union per step.
    outputs = [o for batch in (requests, over_shared) for o in llm.generate(
        [p for p, _ in batch], params, lora_request=[r for _, r in batch], use_tqdm=False)]
    labels += shared_labels
    result = {"labels": labels, "tokens": [list(o.outputs[0].token_ids) for o in outputs],
              "texts": [o.outputs[0].text for o in outputs], "logprobs": [top_logprobs(o) for o in outputs],
              "compilation_mode": llm.llm_engine.vllm_config.compilation_config.mode.name}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(*sys.argv[1:4])
