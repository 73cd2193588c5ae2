"""ms per step of the LoRA linear ops (30 layers, SmolLM2-135M shapes, float32, 1 thread), min of 12 calls.

No model, no engine: PunicaWrapperGrouped gets one step's mapping over 10 rank-8 union members and their mixture
ids, and runs add_lora_linear over every LoRA module of the 30 layers; "base GEMMs" is the same step's base
linear layers plus the lm_head over every row, for scale. Cases: T rows on one expert ("one"), round robin over
8 experts ("eight"), 14 rows over 8 experts plus 2 mixture rows ("gate"), T rows round robin over m distinct
top-2 mixtures ("mixm"), a 150-row prefill chunk on one mixture then T-150 decode rows over m mixtures ("prem").
Run from the repository root, with PYTHONPATH at the tree whose serving/ to time (a `git worktree` of an older
commit for the before):

    PYTHONPATH=. .venv/bin/python benchmarks/results/issue22-20261207/step_probe.py
    PLAN='[(214, ["one", "pre16"])]' PYTHONPATH=. .venv/bin/python benchmarks/results/issue22-20261207/step_probe.py
"""

from __future__ import annotations

import ast
import os
import random
import time

import torch

from benchmarks.fast_lora_ops import HIDDEN, INTER, LAYERS, MODULES, VOCAB

E, RANK, GRID = 10, 8, 20
DEFAULT_PLAN = [(16, ["one", "eight", "gate"]), (64, ["one", "mix1", "mix4", "mix16", "mix64"]),
                (214, ["one", "pre16", "pre64"])]


def _min_ms(fn, calls: int = 12) -> float:
    fn()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


class Cases:
    """Per-row LoRA ids of each case, over one union of E members."""

    def __init__(self):
        from serving.fast_lora.mixture_ids import UnionLayout, encode, member_id

        self.layout, self.encode = UnionLayout.sized(1, E, RANK, grid_units=GRID), encode
        self.members = [member_id(self.layout, e) for e in range(E)]
        self.rng = random.Random(0)

    def mix(self, i: int, j: int, units: int = 13) -> int:
        weights = [0] * E
        weights[i], weights[j] = units, GRID - units
        return self.encode(self.layout, weights, GRID)

    def pool(self, m: int) -> list[int]:
        out: list[int] = []
        while len(out) < m:
            i, j = self.rng.sample(range(E), 2)
            mixture = self.mix(i, j, self.rng.randint(1, GRID - 1))
            if mixture not in out:
                out.append(mixture)
        return out

    def rows(self, name: str, t: int) -> list[int]:
        if name == "one":
            return [self.members[0]] * t
        if name == "eight":
            return [self.members[i % 8] for i in range(t)]
        if name == "gate":
            return [self.members[i % 8] for i in range(t - 2)] + [self.mix(0, 1), self.mix(2, 3)]
        if name.startswith("mix"):
            pool = self.pool(int(name[3:]))
            return [pool[r % len(pool)] for r in range(t)]
        if name.startswith("pre"):
            pool = self.pool(int(name[3:]) + 1)
            return [pool[-1]] * 150 + [pool[r % (len(pool) - 1)] for r in range(t - 150)]
        raise ValueError(name)


def measure(t: int, rows: list[int], ids: list[int], weights: dict, base: dict, lm_head: torch.Tensor) -> str:
    from vllm.lora.layers.utils import LoRAMapping

    from serving.fast_lora.wrapper import PunicaWrapperGrouped

    xs = {d: torch.randn(t, d) for d in (HIDDEN, INTER)}
    ys = {name: torch.randn(t, sum(outs)) for name, (_, outs) in MODULES.items()}
    wrapper = PunicaWrapperGrouped(2048, 256, "cpu")
    mapping = LoRAMapping(tuple(rows), tuple(rows), is_prefill=False)
    started = time.perf_counter()
    for _ in range(20):
        wrapper.update_metadata(mapping, ids, len(ids) + 1, VOCAB)
    metadata_ms = (time.perf_counter() - started) / 20 * 1000

    def lora() -> None:
        for _ in range(LAYERS):
            for name, (a, b, outs) in weights.items():
                wrapper.add_lora_linear(ys[name], xs[MODULES[name][0]], a, b, 1.0, outs)

    def gemms() -> None:
        for _ in range(LAYERS):
            for name, (inp, _) in MODULES.items():
                torch.nn.functional.linear(xs[inp], base[name])
        torch.nn.functional.linear(xs[HIDDEN], lm_head)

    g, lo = _min_ms(gemms), _min_ms(lora)
    return f"base GEMMs {g:7.1f} ms  LoRA ops {lo:6.1f} ms ({lo / g * 100:5.1f}%)  metadata {metadata_ms:.2f} ms"


def main() -> None:
    torch.set_num_threads(1)
    plan = ast.literal_eval(os.environ["PLAN"]) if os.environ.get("PLAN") else DEFAULT_PLAN
    cases = Cases()
    ids, steps = list(cases.members), {}
    for t, names in plan:
        for name in names:
            steps[(t, name)] = rows = cases.rows(name, t)
            ids += [r for r in dict.fromkeys(rows) if r not in ids]
    slots = len(ids)
    weights = {name: (tuple(torch.randn(slots, 1, RANK, inp) * 0.05 for _ in outs),
                      tuple(torch.randn(slots, 1, out, RANK) * 0.05 for out in outs), outs)
               for name, (inp, outs) in MODULES.items()}
    base = {name: torch.randn(sum(outs), inp) for name, (inp, outs) in MODULES.items()}
    lm_head = torch.randn(VOCAB, HIDDEN)
    for (t, name), rows in steps.items():
        print(f"T={t:3d} {name:6s} {measure(t, rows, ids, weights, base, lm_head)}", flush=True)


if __name__ == "__main__":
    main()
