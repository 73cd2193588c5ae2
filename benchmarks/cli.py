"""`mode-cotd bench`: every scenario in one run on this machine; JSON, markdown and PNG plots.

    flock /tmp/heavy.lock mode-cotd bench --quick                      # < 10 min on 2 CPU cores
    flock /tmp/heavy.lock mode-cotd bench -- --no-engine-fast-lora     # flags after `--` go to `mode-cotd serve`

Run it on an otherwise idle machine: it starts `vllm serve` and `mode-cotd serve` itself (one
at a time, on free ports), so nothing else should hold the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

from benchmarks.config import ALL_SCENARIOS, BenchConfig, preset
from mode_cotd.errors import ConfigError
from mode_cotd.paths import REPO_ROOT


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    defaults = BenchConfig()
    p = argparse.ArgumentParser(
        prog="mode-cotd bench",
        description="Throughput of mode-cotd against vLLM's own server and a transformers + peft baseline "
                    "(scenarios a-g), side by side in one run. Arguments after `--` go to `mode-cotd serve`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short preset (under 10 minutes on 2 CPU cores)")
    p.add_argument("--output", type=Path, default=None,
                   help="results folder (default: runs/bench-<UTC time>[-quick]/)")
    p.add_argument("--scenarios", default=ALL_SCENARIOS, help="which of the scenarios a-g to run")
    p.add_argument("--output-tokens", type=int, default=None, help=f"output tokens per request (full: {defaults.output_tokens})")
    p.add_argument("--concurrency", type=_ints, default=None,
                   help=f"closed-loop levels, e.g. 1,4,16,64 (full: {','.join(map(str, defaults.concurrencies))})")
    p.add_argument("--requests", type=int, default=None, help="requests per concurrency level")
    p.add_argument("--rates", type=_floats, default=None, help="open-loop Poisson rates (req/s) on the gate route")
    p.add_argument("--peft-requests", type=int, default=None, help="requests of the peft baseline (g)")
    p.add_argument("--dtype", default=None, help="weights dtype of every scenario (default float32)")
    p.add_argument("--expert", default=None, help=f"expert of scenarios b and d (default {defaults.expert})")
    p.add_argument("--mixture-popularity", default=None, help="popularity of scenario f's mixtures (distinct, "
                   "uniform, zipf:<a>, skewed, identical)")
    p.add_argument("--mixture-k", type=int, default=None, help="experts per explicit mixture")
    p.add_argument("--mixture-grid", type=float, default=None, help="weight grid of explicit mixtures")
    p.add_argument("--scaling-in-flight", type=_ints, default=None, help="distinct mixtures in flight, e.g. 1,4,16,64")
    p.add_argument("--hit-rate-requests", type=int, default=None, help="requests of the hit-rate workload (0: skip)")
    p.add_argument("--no-cross-check", dest="cross_check", action="store_false", default=None,
                   help="skip the `vllm bench serve` cross-check")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="serve mode-cotd with --engine-compile (full: on, quick: off)")
    p.add_argument("--student", default=None, help="student folder (default: the default student)")
    p.add_argument("--bundle", default=None, help="bundle (default: bundles/default)")
    p.add_argument("--serve-args", default="", help="extra `mode-cotd serve` flags, one string")
    p.add_argument("--vllm-args", default="", help="extra `vllm serve` flags, one string")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--report-only", type=Path, default=None, metavar="DIR",
                   help="rewrite results.md and the plots from DIR/results.json, run nothing")
    return p


def config_from_args(args: argparse.Namespace, serve_tail: list[str]) -> BenchConfig:
    unknown = set(args.scenarios) - set(ALL_SCENARIOS)
    if unknown or not args.scenarios:
        raise ConfigError(f"--scenarios takes letters of {ALL_SCENARIOS}, got {args.scenarios!r}")
    return preset(
        "quick" if args.quick else "full",
        scenarios=args.scenarios, output_tokens=args.output_tokens, concurrencies=args.concurrency,
        requests_per_level=args.requests, poisson_rates=args.rates, peft_requests=args.peft_requests,
        dtype=args.dtype, expert=args.expert, mixture_popularity=args.mixture_popularity, mixture_k=args.mixture_k,
        mixture_grid=args.mixture_grid, scaling_in_flight=args.scaling_in_flight,
        hit_rate_requests=args.hit_rate_requests, cross_check=args.cross_check, compile=args.compile,
        student=args.student,
        bundle=args.bundle, serve_args=[*shlex.split(args.serve_args), *serve_tail] or None,
        vllm_args=shlex.split(args.vllm_args) or None, seed=args.seed)


def finish(results: dict, output: Path, command: str) -> None:
    """Ratios, results.json, results.md and the plots."""
    from benchmarks import plots, report

    report.add_ratios(results)
    plots.write_all(results, output)
    json_path, md_path = report.write(results, output, command)
    print(f"[bench] wrote {json_path}, {md_path} and the plots in {output}")
    print(json.dumps({"ratios": results["ratios"]}, indent=2))


def main(argv: list[str]) -> int:
    argv = list(argv)
    serve_tail: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_tail = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    command = "mode-cotd bench " + " ".join(shlex.quote(a) for a in argv + (["--", *serve_tail] if serve_tail else []))
    if args.report_only:
        results = json.loads((args.report_only / "results.json").read_text())
        finish(results, args.report_only, results.get("command", command))
        return 0
    config = config_from_args(args, serve_tail)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    output = args.output or REPO_ROOT / "runs" / f"bench-{stamp}{'-quick' if args.quick else ''}"
    print(f"[bench] preset {'quick' if args.quick else 'full'} -> {output}\n[bench] config: "
          f"{json.dumps(dataclasses.asdict(config))}", flush=True)

    from benchmarks.runner import Runner

    runner = Runner(config, output, echo=lambda line: print(line, flush=True))
    results = runner.run()
    results["command"] = command
    finish(results, output, command)
    return 0 if not results.get("errors") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

