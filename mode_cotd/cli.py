"""The `mode-cotd` console command.

Each subcommand lives in its own module, which exposes ``main(argv: list[str]) -> int``
with its own argparse parser (so ``mode-cotd <cmd> --help`` shows that command's
defaults). The table below names each command's module by an explicit import inside a
one-line function: a command's module (and what it pulls in: torch, vLLM, Ray) is loaded
only when that command runs, so `mode-cotd --help` stays fast and this core package never
imports ray, vllm or fastapi on its own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from mode_cotd.errors import ModeCotdError

Main = Callable[[list[str]], int]


def _student() -> Main:
    from mode_cotd import student
    return student.main


def _teach() -> Main:
    from training import teacher
    return teacher.main


def _distill() -> Main:
    from training import distill
    return distill.main


def _train_gate() -> Main:
    from training import gate
    return gate.main


def _gate_e2e() -> Main:
    from training import gate_e2e
    return gate_e2e.main


def _compose() -> Main:
    from training import compose
    return compose.main


def _eval() -> Main:
    from training import evaluate
    return evaluate.main


def _pipeline() -> Main:
    from training import pipeline
    return pipeline.main


def _serve() -> Main:
    from serving import cli
    return cli.main


def _bench() -> Main:
    from benchmarks import cli
    return cli.main


# name -> (the command's main, one-line help). A plain table: adding a command is one function and one line.
COMMANDS: dict[str, tuple[Callable[[], Main], str]] = {
    "student": (_student, "convert/locate the default student and print its path"),
    "teach": (_teach, "collect teacher rationales (endpoint, released files, programmatic)"),
    "distill": (_distill, "distil one LoRA expert per task over the frozen student"),
    "train-gate": (_train_gate, "train the router (gate) on the seen tasks' prompts"),
    "gate-e2e": (_gate_e2e, "fine-tune the gate through the LM loss of the mixed experts"),
    "compose": (_compose, "search expert weights for a new task from its few shots"),
    "eval": (_eval, "accuracy of a route on the test sets (vLLM batched)"),
    "pipeline": (_pipeline, "teach -> distill -> gate -> compose -> eval from one config"),
    "serve": (_serve, "serve a bundle: Ray Serve + vLLM, OpenAI API on 127.0.0.1:8000"),
    "bench": (_bench, "throughput: mode-cotd vs vLLM's server vs transformers+peft (--quick: < 10 min)"),
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
    command = COMMANDS[name][0]()
    try:
        return int(command(rest) or 0)
    except ModeCotdError as exc:
        print(f"mode-cotd {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
