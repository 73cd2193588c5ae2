"""The grouped LoRA op of a decode step with union members multiplied by their block rank only, against all of
the slot's rows (member_ranks switched off), in one process. Run from the repository root:

    .venv/bin/python benchmarks/results/rank-trim-20261206/rank_trim.py
"""

import time

import torch
from vllm.lora.layers.utils import LoRAMapping

import serving.fast_lora.wrapper as wrapper_module
from benchmarks.fast_lora_ops import HIDDEN, INTER, LAYERS, MODULES
from serving.fast_lora.mixture_ids import UnionLayout, member_id
from serving.fast_lora.wrapper import PunicaWrapperGrouped

BLOCK, SLOT_RANK, REPEAT = 8, 16, 5


def measure(n_experts: int, tokens: int) -> dict[str, float]:
    layout = UnionLayout(1, 10, BLOCK)
    ids = [member_id(layout, e) for e in range(10)]
    slots = len(ids)
    weights = {name: (tuple(torch.randn(slots, 1, SLOT_RANK, inp) for _ in outs),
                      tuple(torch.randn(slots, 1, o, SLOT_RANK) for o in outs), outs)
               for name, (inp, outs) in MODULES.items()}
    for a, b, _ in weights.values():  # rows past the experts' rank are zero, as vLLM leaves a slot
        for t in a:
            t[:, :, BLOCK:] = 0
        for t in b:
            t[..., BLOCK:] = 0
    x = {d: torch.randn(tokens, d) for d in (HIDDEN, INTER)}
    y = {name: torch.randn(tokens, sum(outs)) for name, (_, outs) in MODULES.items()}
    rows = [ids[i % n_experts] for i in range(tokens)]
    best: dict[str, float] = {}
    for label in ("full", "trimmed", "full", "trimmed"):
        original = wrapper_module.member_ranks
        if label == "full":
            wrapper_module.member_ranks = lambda ids: {}
        wrapper = PunicaWrapperGrouped(256, tokens, "cpu")
        wrapper.update_metadata(LoRAMapping(tuple(rows), tuple(rows), is_prefill=False), ids, slots + 1, 49152)
        wrapper_module.member_ranks = original

        def step(w=wrapper):
            for _ in range(LAYERS):
                for name, (a, b, outs) in weights.items():
                    w.add_lora_linear(y[name], x[MODULES[name][0]], a, b, 1.0, outs)

        step()
        started = time.perf_counter()
        for _ in range(REPEAT):
            step()
        ms = (time.perf_counter() - started) / REPEAT * 1000
        best[label] = min(best.get(label, ms), ms)
    return best


if __name__ == "__main__":
    for n_experts, tokens in ((1, 16), (8, 16), (8, 64)):
        best = measure(n_experts, tokens)
        print(f"{n_experts} experts, {tokens} tokens, ms per step (best of 2 runs of {REPEAT}): "
              f"{ {k: round(v, 1) for k, v in best.items()} } full / trimmed {best['full'] / best['trimmed']:.2f}",
              flush=True)
