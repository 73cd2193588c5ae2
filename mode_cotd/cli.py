"""The `mode-cotd` console command.

Each subcommand lives in its own module, which exposes ``main(argv: list[str]) -> int``
with its own argparse parser (so ``mode-cotd <cmd> --help`` shows that command's
defaults). Modules are imported only when their command runs, so this file never imports
ray, vllm or fastapi itself.
"""

from __future__ import annotations

import importlib
import sys

from mode_cotd.errors import ModeCotdError

# name -> (module, one-line help). A plain table: adding a command is one line.
COMMANDS: dict[str, tuple[str, str]] = {
    "student": ("mode_cotd.student", "convert/locate the default student and print its path"),
    "teach": ("training.teacher", "collect teacher rationales (endpoint, released files, programmatic)"),
    "distill": ("training.distill", "distil one LoRA expert per task over the frozen student"),
    "train-gate": ("training.gate", "train the router (gate) on the seen tasks' prompts"),
    "gate-e2e": ("training.gate_e2e", "fine-tune the gate through the LM loss of the mixed experts"),
    "compose": ("training.compose", "search expert weights for a new task from its few shots"),
    "eval": ("training.evaluate", "accuracy of a route on the test sets (vLLM batched)"),
    "pipeline": ("training.pipeline", "teach -> distill -> gate -> compose -> eval from one config"),
    "serve": ("serving.cli", "serve a bundle: Ray Serve + vLLM, OpenAI API on 127.0.0.1:8000"),
    "bench": ("benchmarks.cli", "throughput: mode-cotd vs vLLM's server vs transformers+peft (--quick: < 10 min)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mode-cotd <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `mode-cotd <command> --help` for a command's options and defaults."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mode-cotd: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except ModeCotdError as exc:
        print(f"mode-cotd {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
