"""Time of the mixture LoRA op of one decode step as the union grows: 10, 100, 1,000 experts.

    .venv/bin/python benchmarks/union_scaling_ops.py [--experts 10 100 1000] [--mixtures 1 16 64] [--tokens 64]

No model and no engine: the grouped wrapper gets a decode step of `tokens` requests, each on one of M
distinct top-2 mixture ids (round-robin) over a union of E experts pinned in slots, and runs
`add_lora_linear` over SmolLM2-135M's 30 layers of LoRA-wrapped linear modules (float32, rank 8). To keep
memory bounded, the 30 layers cycle over DISTINCT_LAYERS sets of slot weights (each set larger than the
CPU's caches at E = 1,000, so every layer reads its weights from memory). Prints ms per step and, per M,
the ratio to the smallest union, all measured in one run.
"""

from __future__ import annotations

import argparse
import random

import torch

from benchmarks.fast_lora_ops import HIDDEN, INTER, LAYERS, MODULES, ms_per_call

DISTINCT_LAYERS = 2
GRID = 20


def _measure(experts: int, mixtures: int, tokens: int, rank: int, repeat: int) -> float:
    """ms per decode step of the mixture op, `tokens` rows over `mixtures` distinct top-2 mixtures of `experts`."""
    from vllm.lora.layers.utils import LoRAMapping

    from serving.fast_lora.mixture_ids import UnionLayout, encode, member_id
    from serving.fast_lora.wrapper import PunicaWrapperGrouped

    rng = random.Random(experts * 1000 + mixtures)
    layout = UnionLayout.sized(1, experts, rank, grid_units=GRID)
    mix = set()
    while len(mix) < mixtures:
        i, j = rng.sample(range(experts), 2)
        units = [0] * experts
        units[i], units[j] = 13, 7
        mix.add(encode(layout, units, GRID))
    ids = [member_id(layout, e) for e in range(experts)] + sorted(mix)
    slots = len(ids)
    layers = [{name: (tuple(torch.randn(slots, 1, rank, inp) * 0.05 for _ in outs),
                      tuple(torch.randn(slots, 1, out, rank) * 0.05 for out in outs), outs)
               for name, (inp, outs) in MODULES.items()} for _ in range(DISTINCT_LAYERS)]
    x_by_in = {d: torch.randn(tokens, d) for d in (HIDDEN, INTER)}
    y_by_module = {name: torch.randn(tokens, sum(outs)) for name, (_, outs) in MODULES.items()}
    rows = [sorted(mix)[r % mixtures] for r in range(tokens)]
    wrapper = PunicaWrapperGrouped(max(tokens, 256), tokens, "cpu")
    wrapper.update_metadata(LoRAMapping(tuple(rows), tuple(rows), is_prefill=False), ids, slots + 1, 49152)

    def step() -> None:
        for layer in range(LAYERS):
            for name, (a, b, outs) in layers[layer % DISTINCT_LAYERS].items():
                wrapper.add_lora_linear(y_by_module[name], x_by_in[MODULES[name][0]], a, b, 1.0, outs)

    return ms_per_call(step, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--mixtures", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| mixtures in flight | " + " | ".join(f"{e} experts (ms)" for e in args.experts)
          + f" | {args.experts[-1]} / {args.experts[0]} |")
    print("| --- " * (len(args.experts) + 2) + "|")
    for m in args.mixtures:
        ms = [_measure(e, m, args.tokens, args.rank, args.repeat) for e in args.experts]
        print(f"| {m} | " + " | ".join(f"{v:.1f}" for v in ms) + f" | {ms[-1] / ms[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
