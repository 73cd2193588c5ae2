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
import typing
from pathlib import Path
from typing import Any

from benchmarks import plots, report
from benchmarks.config import ALL_SCENARIOS, PRESETS, BenchConfig, preset
from benchmarks.runner import Runner
from mode_cotd.errors import ConfigError
from mode_cotd.paths import REPO_ROOT
from mode_cotd.settings import field_docs

FLAGS = {
    "--scenarios": "scenarios", "--output-tokens": "output_tokens", "--concurrency": "concurrencies",
    "--requests": "requests_per_level", "--ratio-waves": "ratio_waves", "--rates": "poisson_rates", "--peft-requests": "peft_requests",
    "--dtype": "dtype", "--expert": "expert", "--mixture-popularity": "mixture_popularity",
    "--mixture-k": "mixture_k", "--mixture-grid": "mixture_grid", "--scaling-in-flight": "scaling_in_flight",
    "--hit-rate-requests": "hit_rate_requests", "--cross-check": "cross_check", "--compile": "compile",
    "--prefix-caching": "prefix_caching", "--stream-interval": "stream_interval",
    "--student": "student", "--bundle": "bundle", "--seed": "seed", "--experts-table": "experts_table",
    "--experts-in-flight": "experts_in_flight", "--experts-rank": "experts_rank", "--experts-dtype": "experts_dtype",
    "--experts-cache": "experts_cache", "--experts-paged": "experts_paged", "--experts-resident": "experts_resident",
}
"""Flag -> the BenchConfig field it sets over the preset (help: the field's docstring)."""


def _ints(text: str) -> tuple[int, ...]:
    if text.strip() == "none":
        return ()
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers (or none), got {text!r}")
    return values


def _floats(text: str) -> tuple[float, ...]:
    if text.strip() == "none":  # what --help shows for an empty tuple
        return ()
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _shown(value: Any) -> str:
    return (",".join(map(str, value)) or "none") if isinstance(value, tuple) else str(value)


def _add_field_flag(p: argparse.ArgumentParser, flag: str, name: str) -> None:
    """``flag`` sets field ``name``: its type from the annotation (tuples: comma-separated), help its docstring."""
    hint = typing.get_type_hints(BenchConfig)[name]
    full, quick = getattr(PRESETS["full"], name), getattr(PRESETS["quick"], name)
    shown = f"full: {_shown(full)}, quick: {_shown(quick)}" if full != quick else f"default: {_shown(full)}"
    if typing.get_origin(hint) is tuple:
        shown = f"comma-separated; {shown}"
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                              "help": f"{field_docs(BenchConfig)[name]} ({shown})".replace("%", "%%")}
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = {tuple[int, ...]: _ints, tuple[float, ...]: _floats, int: int, float: float}.get(hint, str)
        kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
    p.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mode-cotd bench",
        description="Throughput of mode-cotd against vLLM's own server and a transformers + peft baseline "
                    "(scenarios a-g), side by side in one run. Arguments after `--` go to `mode-cotd serve`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short preset (under 10 minutes on 2 CPU cores)")
    p.add_argument("--output", type=Path, default=None,
                   help="results folder (default: runs/bench-<UTC time>[-quick]/)")
    for flag, name in FLAGS.items():
        _add_field_flag(p, flag, name)
    p.add_argument("--serve-args", default="", help="extra `mode-cotd serve` flags, one string")
    p.add_argument("--vllm-args", default="", help="extra `vllm serve` flags, one string")
    p.add_argument("--report-only", type=Path, default=None, metavar="DIR",
                   help="rewrite results.md and the plots from DIR/results.json, run nothing")
    return p


def config_from_args(args: argparse.Namespace, serve_tail: list[str]) -> BenchConfig:
    """The preset (--quick or full) with the given flags' fields replaced."""
    given = {name: value for name, value in vars(args).items() if name in FLAGS.values()}
    scenarios = given.get("scenarios", ALL_SCENARIOS)
    if set(scenarios) - set(ALL_SCENARIOS) or not scenarios:
        raise ConfigError(f"--scenarios takes letters of {ALL_SCENARIOS}, got {scenarios!r}")
    return preset("quick" if args.quick else "full", **given,
                  serve_args=[*shlex.split(args.serve_args), *serve_tail] or None,
                  vllm_args=shlex.split(args.vllm_args) or None)


def finish(results: dict, output: Path, command: str) -> None:
    """Ratios, results.json, results.md and the plots."""
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

    runner = Runner(config, output, echo=lambda line: print(line, flush=True))
    results = runner.run()
    results["command"] = command
    finish(results, output, command)
    return 0 if not results.get("errors") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

