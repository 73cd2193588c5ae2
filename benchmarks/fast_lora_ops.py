"""Time of the LoRA ops of one decode step of the default student, vLLM's CPU wrapper against the grouped one.

    .venv/bin/python benchmarks/fast_lora_ops.py [--tokens 64] [--adapters 1 10] [--rank 8]

No model and no engine: both wrappers get the same step mapping (every token with an adapter,
adapters round-robin over the requests) and run `add_lora_linear` on SmolLM2-135M's shapes
(30 layers x qkv, o, gate_up, down, bf16) plus `add_lora_logits` on its 49152-token head
(lm_head not targeted: zero weights, as in vLLM when an adapter has no lm_head LoRA), and the
base model's own GEMMs of the same step for scale. Prints milliseconds per step.
"""

from __future__ import annotations

import argparse
import time

import torch

LAYERS, HIDDEN, KV, INTER, VOCAB = 30, 576, 192, 1536, 49152
MODULES = {"qkv": (HIDDEN, (HIDDEN, KV, KV)), "o": (HIDDEN, (HIDDEN,)), "gate_up": (HIDDEN, (INTER, INTER)),
           "down": (INTER, (HIDDEN,))}
"""name: (input size, output slices) of SmolLM2-135M's LoRA-wrapped linear layers."""


def _step(wrapper, weights, x_by_in, y_by_module, logits_w, hidden, logits) -> None:
    for _ in range(LAYERS):
        for name, (a, b, slices) in weights.items():
            wrapper.add_lora_linear(y_by_module[name], x_by_in[MODULES[name][0]], a, b, 1.0, slices)
    wrapper.add_lora_logits(logits, hidden, *logits_w, 1.0)


def ms_per_call(fn, repeat: int) -> float:
    """Milliseconds per call of fn, over `repeat` calls after one warm-up call."""
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    for n in args.adapters:
        row = _measure(n, args.tokens, args.rank, args.repeat)
        print(f"{args.tokens} tokens, {n} adapter(s), rank {args.rank}: "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in row.items()), flush=True)


def _measure(n: int, t: int, rank: int, repeat: int) -> dict[str, float]:
    """ms per step: vLLM's wrapper, the grouped one, and the base GEMMs, for n adapters round-robin over t tokens."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from serving.fast_lora.wrapper import PunicaWrapperGrouped  # pulls in vLLM, like the two imports above

    dt, slots = torch.bfloat16, n + 1
    weights = {
        name: (tuple(torch.randn(slots, 1, rank, inp, dtype=dt) * 0.05 for _ in outs),
               tuple(torch.randn(slots, 1, out, rank, dtype=dt) * 0.05 for out in outs), outs)
        for name, (inp, outs) in MODULES.items()
    }
    logits_w = (torch.zeros(slots, 1, rank, HIDDEN, dtype=dt), torch.zeros(slots, 1, VOCAB, rank, dtype=dt))
    x_by_in = {d: torch.randn(t, d, dtype=dt) for d in (HIDDEN, INTER)}
    y_by_module = {name: torch.randn(t, sum(outs), dtype=dt) for name, (_, outs) in MODULES.items()}
    hidden, logits = torch.randn(t, HIDDEN, dtype=dt), torch.randn(t, VOCAB, dtype=dt)
    ids = [1 + i % n for i in range(t)]
    mapping = LoRAMapping(tuple(ids), tuple(ids), is_prefill=True)
    row = {}
    for label, cls in (("vllm", PunicaWrapperCPU), ("grouped", PunicaWrapperGrouped)):
        wrapper = cls(max(t, 256), t, "cpu")
        wrapper.update_metadata(mapping, [*range(1, n + 1), None], slots + 1, VOCAB)
        row[label] = ms_per_call(lambda w=wrapper: _step(w, weights, x_by_in, y_by_module, logits_w, hidden, logits), repeat)
    base_w = {name: torch.randn(sum(outs), inp, dtype=dt) for name, (inp, outs) in MODULES.items()}
    head = torch.randn(VOCAB, HIDDEN, dtype=dt)

    def base_step():
        for _ in range(LAYERS):
            for name, (inp, _) in MODULES.items():
                torch.nn.functional.linear(x_by_in[inp], base_w[name])
        torch.nn.functional.linear(hidden, head)

    row["base_gemms"] = ms_per_call(base_step, 1)
    return row

if __name__ == "__main__":
    main()
