"""Run by test_union_equivalence.py in a subprocess: one engine with the fast path, mixtures two ways.

The default bundle's experts are loaded and pinned under their member ids; then every prompt
runs, in one batch, (1) as a top-2 mixture id over the placeholder adapter (the union path) and
(2) as the same mixture's exact composite, written with mode_cotd.mixing.compose_exact, plus
(3) one expert by its member id and (4) the base. A second union over the same experts takes
SHARED as its shared adapter (weight 1 under every mixture id, serving/mixture_union.py), and
each mixture also runs (5) as its mixture id and (6) as the composite of mixture + SHARED, in a
second batch (the fast path serves one union's mixture ids per step). A third union over the same experts
takes sparse mixture ids (as a union of over 16 routed experts does): the mixtures of one or two experts run
(7) as its sparse ids and (8) as their composites, in a third batch. Prints the greedy token ids and top logprobs
of each as JSON on a RESULT line, with vLLM's compilation mode (MODE_COTD_LORA_COMPILE=1 compiles).
"""

import json
import sys
import tempfile
from pathlib import Path

SHARED = "tracking_shuffled_objects"
"""Stands in for a shared adapter in the second union (no mixture below uses it)."""
MIXTURES = [{"gsm8k": 0.65, "last_letter_concatenation": 0.35}, {"aqua": 0.5, "gsm8k": 0.5},
            {"addsub": 0.8, "svamp": 0.2}, {"addsub": 0.4, "gsm8k": 0.35, "svamp": 0.25},
            {"addsub": 0.25, "aqua": 0.15, "commonsense_qa": 0.15, "date_understanding": 0.1, "gsm8k": 0.1,
             "last_letter_concatenation": 0.1, "multiarith": 0.1, "single_eq": 0.05}]
"""Mixtures of 2, 3 and 8 experts. In one decode step of the first batch, the 8-expert mixture's own experts are
used by few rows: the union serves them by (row, expert) pairs, the others by blocks."""
MAX_LORA_RANK = 64
"""The 8-expert mixture's exact composite of the default bundle's r8 experts has rank 64."""
SHARED_MAX_EXPERTS = 3
"""Mixtures run over the shared union: those whose composite with SHARED stays within MAX_LORA_RANK (the
8-expert one with SHARED would need rank 72)."""


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
    union = MixtureUnion.for_experts(experts, work, grid_units=20, max_lora_rank=MAX_LORA_RANK)
    shared = MixtureUnion.for_experts(experts, work, grid_units=20, max_lora_rank=MAX_LORA_RANK, shared=SHARED)
    sparse = MixtureUnion.for_experts(experts, work, grid_units=20, max_lora_rank=MAX_LORA_RANK, sparse=True)
    assert sparse.layout.sparse and not union.layout.sparse
    llm = LLM(model=student, enable_lora=True, max_lora_rank=MAX_LORA_RANK, max_loras=3 * len(experts) + 12, max_model_len=512,
              dtype=dtype, seed=0, kv_cache_memory_bytes=256 * 2**20)
    for member in union.members + shared.members + sparse.members:
        assert llm.llm_engine.add_lora(LoRARequest(member.name, member.lora_id, member.path))
        assert llm.llm_engine.pin_lora(member.lora_id)
    requests, labels, over_shared, shared_labels, by_sparse, sparse_labels = [], [], [], [], [], []
    for m, weights in enumerate(MIXTURES):
        key = Mixture(tuple(weights), tuple(weights.values()))
        target = union.target(AdapterSpec(key))
        composite = work / f"composite-{m}"
        save_adapter(compose_exact([load_adapter(experts[n]) for n in key.experts], list(key.weights)), composite)
        for prompt in PROMPTS:
            requests += [(prompt, LoRARequest(target.name, target.lora_id, target.path)),
                         (prompt, LoRARequest(f"composite-{m}", 1000 + m, str(composite)))]
            labels += [f"union-{m}", f"composite-{m}"]
        if len(weights) <= SHARED_MAX_EXPERTS:  # the composite of mixture + shared stays within MAX_LORA_RANK
            over = with_shared(key, SHARED)
            shared_target = shared.target(AdapterSpec(over))
            shared_composite = work / f"shared-composite-{m}"
            save_adapter(compose_exact([load_adapter(experts[n]) for n in over.experts], list(over.weights)),
                         shared_composite)
            for prompt in PROMPTS:
                over_shared += [(prompt, LoRARequest("shared-" + shared_target.name, shared_target.lora_id,
                                                     shared_target.path)),
                                (prompt, LoRARequest(f"shared-composite-{m}", 2000 + m, str(shared_composite)))]
                shared_labels += [f"shared-union-{m}", f"shared-composite-{m}"]
        if len(weights) <= 2:
            sparse_target = sparse.target(AdapterSpec(key))
            for prompt in PROMPTS:
                by_sparse += [(prompt, LoRARequest("sparse-" + sparse_target.name, sparse_target.lora_id,
                                                   sparse_target.path)),
                              (prompt, LoRARequest(f"composite-{m}", 1000 + m, str(composite)))]
                sparse_labels += [f"sparse-union-{m}", f"composite-{m}"]
    expert = union.member("gsm8k")
    for prompt in PROMPTS:
        requests += [(prompt, LoRARequest(expert.name, expert.lora_id, expert.path)), (prompt, None)]
        labels += ["member-gsm8k", "base"]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=TOP_LOGPROBS)
    # One batch per union: the fast path serves mixture ids of one union per step.
    outputs = [o for batch in (requests, over_shared, by_sparse) for o in llm.generate(
        [p for p, _ in batch], params, lora_request=[r for _, r in batch], use_tqdm=False)]
    labels += shared_labels + sparse_labels
    result = {"labels": labels, "tokens": [list(o.outputs[0].token_ids) for o in outputs],
              "texts": [o.outputs[0].text for o in outputs], "logprobs": [top_logprobs(o) for o in outputs],
              "compilation_mode": llm.llm_engine.vllm_config.compilation_config.mode.name}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(*sys.argv[1:4])
