"""Block-scaled mixture LoRA against a single LoRA and distinct composites, one Llama-3-8B layer on CUDA.

    PYTHONPATH=. python benchmarks/cuda_mixture_ops.py --out cuda_mixture_ops.json
    PYTHONPATH=. python benchmarks/cuda_mixture_ops.py --cpu-smoke --out /tmp/cms.json

For T tokens (64: a decode batch; 2048: a prefill chunk), bf16, the 7 linear modules of one decoder
layer (q, k, v, o, gate, up, down) run as one CUDA graph, replayed --replays times per trial between
two CUDA events (warm-up first); the table gives the median ms per layer and the ratio to `base`:

    base        y = x @ Wᵀ per module
    single      base + one r16 LoRA per module
    mixture     base + an exact top-2-of-10 r16 mixture per token (softmax weights, a random pair per
                token): block_scaled_lora on the 10 experts' r160 union, one GEMM pair per module
    composites  base + 16 distinct r32 composites, each token in one of 16 contiguous groups, one GEMM
                pair per composite on its segment

First a correctness check: block_scaled_lora against a float32 per-expert reference on random data
(unequal ranks); the script exits 1 when the max abs error exceeds the bf16 tolerance.
--cpu-smoke: tiny shapes on the CPU, no graphs, wall-clock timing; only checks that everything runs.
Imports torch and serving.fast_lora.block_scale only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    from serving.fast_lora.block_scale import block_scaled_lora, build_union
except ModuleNotFoundError:  # run as a file from a checkout without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from serving.fast_lora.block_scale import block_scaled_lora, build_union

MODULES = {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096),
           "gate": (4096, 14336), "up": (4096, 14336), "down": (14336, 4096)}
"""name: (input size H, output size N) of Llama-3-8B's linear modules."""
EXPERTS, EXPERT_RANK, TOP_K = 10, 16, 2
GROUPS, COMPOSITE_RANK = 16, 32
VARIANTS = ("base", "single", "mixture", "composites")
TOLERANCE = 1e-2
"""bf16 check: max abs error ≤ TOLERANCE · (max |reference| + 1), ~3 bf16 ulps at the output's magnitude."""


def _randn(*shape: int, gen: torch.Generator, device: str, dtype=torch.bfloat16, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)


def _top_k_weights(t: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """[T, E] float32: per token a random top-2 of 10 experts, weights softmax-normalised over the pair."""
    top = torch.randn(t, EXPERTS, generator=gen, device=device).topk(TOP_K, dim=1)
    return torch.zeros(t, EXPERTS, device=device).scatter_(1, top.indices, top.values.softmax(dim=1))


def _variants(t: int, modules: dict[str, tuple[int, int]], base_w: dict[str, torch.Tensor], gen: torch.Generator,
              device: str) -> dict[str, Callable[[], None]]:
    """One closure per variant running the layer's modules on fixed random inputs (static for graph capture)."""
    xs = {h: _randn(t, h, gen=gen, device=device) for h in {h for h, _ in modules.values()}}  # [T, H]
    ys = {name: torch.empty(t, n, dtype=torch.bfloat16, device=device) for name, (_, n) in modules.items()}
    single, union, composites = {}, {}, {}
    for name, (h, n) in modules.items():
        single[name] = (_randn(EXPERT_RANK, h, gen=gen, device=device, std=h**-0.5),  # [r, H]
                        _randn(n, EXPERT_RANK, gen=gen, device=device, std=EXPERT_RANK**-0.5))  # [N, r]
        experts = [(_randn(EXPERT_RANK, h, gen=gen, device=device, std=h**-0.5),
                    _randn(n, EXPERT_RANK, gen=gen, device=device, std=EXPERT_RANK**-0.5), 2.0) for _ in range(EXPERTS)]
        union[name] = build_union(experts)  # ([E·r, H], [N, E·r], r)
        composites[name] = (_randn(GROUPS, COMPOSITE_RANK, h, gen=gen, device=device, std=h**-0.5),  # [G, R, H]
                            _randn(GROUPS, n, COMPOSITE_RANK, gen=gen, device=device, std=COMPOSITE_RANK**-0.5))
    weights = _top_k_weights(t, gen, device)  # [T, E]
    bounds = [(int(s[0]), int(s[-1]) + 1) for s in torch.arange(t).tensor_split(GROUPS) if len(s)]

    def base() -> None:
        for name, (h, _) in modules.items():
            torch.mm(xs[h], base_w[name].t(), out=ys[name])  # [T, N]

    def with_single() -> None:
        base()
        for name, (h, _) in modules.items():
            a, b = single[name]
            ys[name].addmm_(xs[h] @ a.t(), b.t())

    def with_mixture() -> None:
        base()
        for name, (h, _) in modules.items():
            a_union, b_union, r = union[name]
            block_scaled_lora(ys[name], xs[h], a_union, b_union, weights, r)

    def with_composites() -> None:
        base()
        for name, (h, _) in modules.items():
            a, b = composites[name]
            for g, (lo, hi) in enumerate(bounds):
                ys[name][lo:hi].addmm_(xs[h][lo:hi] @ a[g].t(), b[g].t())  # [t_g, N]

    return dict(zip(VARIANTS, (base, with_single, with_mixture, with_composites)))


def _time_graph(fn: Callable[[], None], replays: int, trials: int) -> float:
    """Median ms per call of fn captured in a CUDA graph: warm-up on a side stream, capture, replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(max(10, replays // 10)):
        graph.replay()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    del graph
    return statistics.median(times)


def _time_eager(fn: Callable[[], None], replays: int, trials: int) -> float:
    fn()
    times = []
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(replays):
            fn()
        times.append((time.perf_counter() - started) / replays * 1000)
    return statistics.median(times)


def _absmax(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def correctness(t: int, h: int, n: int, gen: torch.Generator, device: str) -> dict[str, float | bool]:
    """block_scaled_lora (bf16) against y + Σᵢ w[:, i] · (x Aᵢᵀ)(sᵢ Bᵢ)ᵀ in float32, experts of ranks 16 and 8."""
    ranks = [EXPERT_RANK if i % 3 else EXPERT_RANK // 2 for i in range(EXPERTS)]
    experts = [(_randn(r, h, gen=gen, device=device, std=h**-0.5),
                _randn(n, r, gen=gen, device=device, std=r**-0.5), 0.5 + i / EXPERTS) for i, r in enumerate(ranks)]
    x, y = _randn(t, h, gen=gen, device=device), _randn(t, n, gen=gen, device=device)
    weights = _top_k_weights(t, gen, device)
    weights[::5, 0] = -0.5  # a few negative weights on top of the mixtures
    a_union, b_union, r = build_union(experts)
    out = y.clone()
    block_scaled_lora(out, x, a_union, b_union, weights, r)
    ref = y.float()
    for i, (a, b, s) in enumerate(experts):
        ref = ref + weights[:, i : i + 1] * ((x.float() @ a.float().t()) @ (b.float() * s).t())  # [T, N]
    err, scale = _absmax(out.float() - ref), _absmax(ref)
    return {"tokens": t, "hidden": h, "out": n, "max_abs_err": err, "max_abs_ref": scale,
            "tolerance": TOLERANCE * (scale + 1), "ok": err <= TOLERANCE * (scale + 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 2048])
    parser.add_argument("--replays", type=int, default=100, help="graph replays per trial")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, no graphs")
    args = parser.parse_args()

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("CUDA is not available (use --cpu-smoke on a CPU)", file=sys.stderr)
        return 2
    device = "cpu" if smoke else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference stays float32
    shrink = 64 if smoke else 1
    modules = {name: (h // shrink, n // shrink) for name, (h, n) in MODULES.items()}
    tokens = [4, 32] if smoke else args.tokens
    replays, trials = (2, 1) if smoke else (args.replays, args.trials)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    checks = [correctness(t, h, n, gen, device) for t, h, n in
              ([(33, 64, 48), (0, 64, 48)] if smoke else [(300, 4096, 1024), (64, 14336, 4096), (0, 4096, 1024)])]
    for c in checks:
        print(f"check T={c['tokens']} H={c['hidden']} N={c['out']}: max abs err {c['max_abs_err']:.3g} "
              f"(max |ref| {c['max_abs_ref']:.3g}, tolerance {c['tolerance']:.3g}) {'ok' if c['ok'] else 'FAILED'}")

    base_w = {name: _randn(n, h, gen=gen, device=device, std=h**-0.5) for name, (h, n) in modules.items()}
    timer = _time_eager if smoke else _time_graph
    results = {}
    for t in tokens:
        fns = _variants(t, modules, base_w, gen, device)
        ms = {v: timer(fns[v], replays, trials) for v in VARIANTS}
        results[str(t)] = {"ms": ms, "ratio": {v: ms[v] / ms["base"] for v in VARIANTS}}
        del fns
        if not smoke:
            torch.cuda.empty_cache()

    name = "cpu (smoke)" if smoke else torch.cuda.get_device_name()
    print(f"\n{name}, torch {torch.__version__}, bf16, one layer (7 modules), ms per layer (ratio to base)")
    print(f"{'T':>6}" + "".join(f"{v:>20}" for v in VARIANTS))
    for t, row in results.items():
        print(f"{t:>6}" + "".join(f"{row['ms'][v]:>11.3f} ({row['ratio'][v]:5.2f}x)" for v in VARIANTS))
    report = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": smoke,
              "dtype": "bfloat16", "modules": modules, "replays": replays, "trials": trials,
              "experts": EXPERTS, "expert_rank": EXPERT_RANK, "top_k": TOP_K, "groups": GROUPS,
              "composite_rank": COMPOSITE_RANK, "tokens": results, "checks": checks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
