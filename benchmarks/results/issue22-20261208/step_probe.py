"""ms of a decode step's LoRA ops (30 layers of distinct weights, the 135M student's shapes, float32, one thread)
by layout: the fused kernel (serving/fast_lora/pair_kernel.cpp) against the torch layouts (batch, dense).

Steps: e (the gate route: 14 single-expert rows and 2 top-2 mixture rows over 10 experts), f16 / f64 (16 / 64
rows, each on one of 16 top-2 mixtures of 10 experts), d (one expert, 16 rows: flat in the kernel's layout, a
run of one matmul pair per slice in the others).
Run: .venv/bin/python benchmarks/results/issue22-20261208/step_probe.py
"""
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import torch
from vllm.lora.layers.utils import LoRAMapping

import serving.fast_lora.pairs as P
from benchmarks.fast_lora_ops import HIDDEN, INTER, LAYERS, MODULES
from serving.fast_lora.mixture_ids import UnionLayout, encode, member_id
from serving.fast_lora.wrapper import PunicaWrapperGrouped

torch.set_num_threads(1)
E, R = 10, 8
layout = UnionLayout.sized(1, E, R, grid_units=20)


def mixid(d):
    u = [0] * E
    for e, w in d.items():
        u[e] = w
    return encode(layout, u, 20)


rng = random.Random(0)
m1, m2 = mixid({6: 19, 8: 1}), mixid({4: 11, 7: 9})
mixes = [mixid(dict(zip(rng.sample(range(E), 2), (w := rng.randint(1, 19), 20 - w)))) for _ in range(16)]
ids = [member_id(layout, e) for e in range(E)] + [m1, m2] + mixes + [None] * 30
S = len(ids)
singles = [member_id(layout, e) for e in range(6)]
STEPS = {
    "e": singles + [m1, member_id(layout, 7), m2, member_id(layout, 9)] + singles,
    "f16": [mixes[i % 16] for i in range(16)],
    "f64": [mixes[rng.randrange(16)] for _ in range(64)],
    "d": [member_id(layout, 4)] * 16,
}
LAYOUTS = {"fused": {}, "batch": {"FLAT_MAX_PAIRS": -1, "DENSE_CELLS_PER_PAIR": 0.0},
           "dense": {"FLAT_MAX_PAIRS": -1, "DENSE_CELLS_PER_PAIR": 1e9, "DENSE_MIN_PAIRS_PER_ROW": 0.0}}
torch.manual_seed(0)
weights = [{n: (tuple(torch.randn(S, 1, 16, i) * .05 for _ in o), tuple(torch.randn(S, 1, out, 16) * .05 for out in o),
                o) for n, (i, o) in MODULES.items()} for _ in range(LAYERS)]


def measure(rows, patch):
    saved = {k: getattr(P, k) for k in patch}
    for k, v in patch.items():
        setattr(P, k, v)
    w = PunicaWrapperGrouped(2048, 64, "cpu")
    w.update_metadata(LoRAMapping(tuple(rows), tuple(rows), is_prefill=False), ids, S, 49152)
    for k, v in saved.items():
        setattr(P, k, v)
    g = torch.Generator().manual_seed(1)
    x = {d: torch.randn(len(rows), d, generator=g) for d in (HIDDEN, INTER)}
    y = {n: torch.zeros(len(rows), sum(o)) for n, (_, o) in MODULES.items()}

    def step():
        for layer in weights:
            for n, (a, b, o) in layer.items():
                w.add_lora_linear(y[n], x[MODULES[n][0]], a, b, 1.0, o)
    step()
    times = []
    for _ in range(15):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1000, {n: v.clone() for n, v in y.items()}


for trial in range(2):
    for name, rows in STEPS.items():
        results = {label: measure(rows, patch) for label, patch in LAYOUTS.items()}
        ref = results["batch"][1]
        diff = max((results["fused"][1][n] - ref[n]).abs().max().item() for n in ref)
        print(f"trial {trial} {name:4s} " + "  ".join(f"{k} {v[0]:6.2f} ms" for k, v in results.items())
              + f"  fused/batch {results['fused'][0] / results['batch'][0]:.2f}  max |fused - batch| {diff:.1e}",
              flush=True)
