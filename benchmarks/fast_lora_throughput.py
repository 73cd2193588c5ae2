"""Offline vLLM throughput with and without mode-cotd's fast LoRA path, side by side in one run.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/fast_lora_throughput.py

Each engine runs in its own process (vLLM picks its platform, and so its LoRA ops, once per
process, from MODE_COTD_FAST_LORA): vLLM's own engine without LoRA (its CPU default, compiled),
then a LoRA-enabled engine with vLLM's LoRA ops, then one with the grouped ops. Each LoRA engine
runs the same scenarios: no adapter, one expert for every request, the bundle's experts
round-robin. Requests are greedy, `ignore_eos`, a fixed number of output tokens each, all
submitted at once through `LLM.generate`; output tok/s = output tokens / wall time of that call
(after a warm-up call that loads the adapters). Results go to benchmarks/results/ as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mode_cotd.student import resolve_student
from serving.fast_lora.plugin import installed_vllm_version

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "fast_lora_throughput.json"

ENGINES: dict[str, dict[str, Any]] = {
    # name: LoRA enabled?, environment of its process, scenarios it runs
    "vllm_no_lora": {"lora": False, "env": {"MODE_COTD_FAST_LORA": "0"}, "scenarios": ["base"]},
    "vllm_lora_ops": {"lora": True, "env": {"MODE_COTD_FAST_LORA": "0"}, "scenarios": ["base", "one_expert", "experts"]},
    "fast_lora": {"lora": True, "env": {"MODE_COTD_FAST_LORA": "1"}, "scenarios": ["base", "one_expert", "experts"]},
}
"""The engines compared; each is started in a fresh process."""

TOPICS = ["apples", "marbles", "books", "pencils", "cookies", "stamps", "coins", "shells"]


def prompts(n: int) -> list[str]:
    """n distinct word problems of ~40 tokens each (chat-formatted by nothing: plain completion prompts)."""
    return [
        f"Question: Sam has {3 + i % 17} {TOPICS[i % len(TOPICS)]} and buys {5 + i % 11} more, then gives "
        f"{1 + i % 4} to each of his {2 + i % 3} friends. How many {TOPICS[i % len(TOPICS)]} does he have left? "
        "Let's think step by step.\nAnswer:"
        for i in range(n)
    ]


def run_engine(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One engine's scenarios, in this process (vLLM must not have been imported with another switch)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.platforms import current_platform

    spec = ENGINES[name]
    experts = sorted(p for p in (REPO / args.bundle / "experts").iterdir() if p.is_dir())[: args.experts]
    kwargs: dict[str, Any] = {"model": str(resolve_student()), "dtype": args.dtype, "max_model_len": 512,
                              "max_num_seqs": args.requests, "gpu_memory_utilization": args.gpu_memory_utilization,
                              "seed": 0, "enforce_eager": args.enforce_eager}
    if spec["lora"]:
        kwargs.update(enable_lora=True, max_loras=len(experts), max_cpu_loras=len(experts), max_lora_rank=args.rank)
    started = time.monotonic()
    llm = LLM(**kwargs)
    startup_s = time.monotonic() - started
    wrapper = current_platform.get_punica_wrapper() if spec["lora"] else None
    loras = [LoRARequest(p.name, i + 1, str(p)) for i, p in enumerate(experts)]
    batch = prompts(args.requests)
    choice = {
        "base": [None] * args.requests,
        "one_expert": [loras[0]] * args.requests,
        "experts": [loras[i % len(loras)] for i in range(args.requests)],
    }
    params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True)
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    results = {}
    for scenario in spec["scenarios"]:
        llm.generate(batch, warm, lora_request=choice[scenario], use_tqdm=False)
        t0 = time.monotonic()
        outputs = llm.generate(batch, params, lora_request=choice[scenario], use_tqdm=False)
        wall = time.monotonic() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        results[scenario] = {"output_tokens": tokens, "wall_s": round(wall, 3), "output_tok_s": round(tokens / wall, 2),
                             "adapters": len({id(c) for c in choice[scenario] if c is not None})}
        print(f"[{name}] {scenario}: {tokens / wall:.1f} output tok/s ({tokens} tokens, {wall:.1f} s)",
              file=sys.stderr, flush=True)
    return {"engine": name, "startup_s": round(startup_s, 1), "punica_wrapper": wrapper,
            "compilation_mode": str(llm.llm_engine.vllm_config.compilation_config.mode),
            "scenarios": results}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {list(ENGINES)}")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--bundle", default="bundles/default")
    parser.add_argument("--experts", type=int, default=10, help="experts of the bundle used (one LoRA slot each)")
    parser.add_argument("--rank", type=int, default=8, help="max_lora_rank")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--dtype", default="auto", help="engine dtype (auto: the student's, bfloat16)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # one engine, in a fresh process
        print("RESULT " + json.dumps(run_engine(args.child, args)), flush=True)
        return 0

    engines = []
    for name in args.engines.split(","):
        env = {**os.environ, **ENGINES[name]["env"]}
        cmd = [sys.executable, __file__, *argv, "--child", name]
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-4000:], file=sys.stderr)
            raise SystemExit(f"engine {name} failed (exit {proc.returncode})")
        engines.append(json.loads(lines[-1][len("RESULT "):]))

    import torch
    import vllm  # noqa: F401  (version only; this process runs no engine)

    report = {
        "benchmark": "fast_lora_throughput",
        "command": " ".join(["benchmarks/fast_lora_throughput.py", *argv]),
        "workload": {"requests": args.requests, "output_tokens": args.output_tokens, "greedy": True,
                     "ignore_eos": True, "experts": args.experts, "max_lora_rank": args.rank,
                     "enforce_eager": args.enforce_eager, "dtype": args.dtype},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "vllm": installed_vllm_version()},
        "engines": engines,
        "ratios_to_no_lora": _ratios(engines),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios_to_no_lora"], indent=2))
    print(f"wrote {args.out}")
    return 0


def _ratios(engines: list[dict[str, Any]]) -> dict[str, float]:
    """Each engine's scenario throughput over the no-LoRA engine's (or, without it, that engine's own base)."""
    by_name = {e["engine"]: e for e in engines}
    ref = by_name.get("vllm_no_lora", {}).get("scenarios", {}).get("base", {}).get("output_tok_s")
    ratios = {}
    for e in engines:
        base = ref or e["scenarios"].get("base", {}).get("output_tok_s")
        for scenario, r in e["scenarios"].items():
            ratios[f"{e['engine']}/{scenario}"] = round(r["output_tok_s"] / base, 3) if base else None
    return ratios


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
