"""The paper's mechanism for seen tasks: a few-shot composition of all the experts per seen task (issue 27).

The published MoDE-CoTD code runs its LoraHub search once per dataset, seen tasks included: weights over
every expert from a few shots, then the merge. Here each seen task gets its shots from its validation split
of the train file (the residual recipe's <residual>/data/<task>.val.jsonl, the first SHOTS examples with a
rationale; never a test file), and a composition is searched (training/compose.py, 40 evaluations) for each
VARIANTS entry:

    residual-exact    over the residual experts, on top of all_data (bundles/residual), exact mixing
    residual-linear   the same, the paper's linear merge (all_data added exactly on top)
    default-exact     over the default bundle's experts (trained on the bare student), exact mixing
    default-linear    the same, linear

Each is recorded in its bundle as "<task>-seen-<mode>" (served as mode-cotd:<task>-seen-<mode>), with its
report in <out>/reports/. The objective is the objective study's winner (training/recipes/objective_study.py,
its summary.json) when it has one, else the paper's few-shot loss; the report names it. Resumable: a
composition already in its bundle is skipped.

Two scorers run the search (`--scorer`):

    server    (default) `mode-cotd serve` on the bundle with runtime routes on, one composition job per
              composition (serving/composition_jobs.py, the `mode-cotd compose --server` path): weights on the
              simplex, each candidate scored by the engine's prompt logprobs; about a minute a search here
    offline   training/compose.py: the paper's box [-3, 3], each candidate scored by peft in this process;
              about 17 min a search here

    python -m training.recipes.seen_compositions [--variants residual-exact ...] [--tasks ...] [--objective ...]
        [--scorer server|offline] [--serve-arg=--engine-cpu-threads-bind --serve-arg=0-1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mode_cotd.atomic import write_json_atomic
from mode_cotd.bundle import add_composition, read_manifest
from mode_cotd.data import load_examples, write_jsonl
from mode_cotd.tasks import SEEN_TASKS
from training.compose import ComposeConfig, compose, load_shots
from training.objectives import OBJECTIVES
from training.remote_compose import SERVER_OBJECTIVES, compose_on_server

Search = Callable[[ComposeConfig], dict]
"""Runs one composition search and records it in config.bundle; its weights (without the shared adapter)."""

SHOTS = 5
"""Shots per seen task (the paper's k)."""
VARIANTS = {"residual-exact": ("residual", "exact"), "residual-linear": ("residual", "linear"),
            "default-exact": ("default", "exact"), "default-linear": ("default", "linear")}
"""Variant -> (bundle key, mode)."""
MAX_LENGTH = 1024
"""Most tokens per shot: the evaluation's context (the answer loss needs the whole rationale in it)."""


def composition_name(task: str, mode: str) -> str:
    """The name a seen task's composition is recorded (and served) under."""
    return f"{task}-seen-{mode}"


def write_shots(residual_out: Path, task: str, out: Path) -> Path:
    """<out>/shots/<task>.jsonl: the first SHOTS validation examples of the task with a rationale."""
    shots = [e for e in load_examples(residual_out / "data" / f"{task}.val.jsonl", task) if e.rationale][:SHOTS]
    if len(shots) < SHOTS:
        raise SystemExit(f"{task}: only {len(shots)} validation examples with a rationale, {SHOTS} needed")
    path = out / "shots" / f"{task}.jsonl"
    write_jsonl(path, shots)
    return path


def chosen_objective(study_out: Path, given: str | None) -> str:
    """`given`, else the objective study's winner, else the paper's few-shot loss."""
    if given is not None:
        return given
    summary = study_out / "summary.json"
    return json.loads(summary.read_text())["best"] if summary.is_file() else "few_shot_loss"


def search_offline(config: ComposeConfig) -> dict:
    """training/compose.py in this process (it records the composition itself)."""
    return compose(config).weights


def search_on_server(servers: dict[str, str]) -> Search:
    """A search run as a composition job (priority "shared") on the server of the config's bundle, then recorded
    in the bundle with the job's report."""
    def search(config: ComposeConfig) -> dict:
        shots, source = load_shots(config)
        job = compose_on_server(ComposeConfig(**{**config.__dict__, "server": servers[config.bundle]}), shots,
                                priority="shared")
        result = job["result"]
        report = {"scorer": "server", "objective": job["objective"], "mode": job["mode"], "shots": source,
                  "loss": result["loss"], "trace": result["trace"], "seconds": result["seconds"],
                  "shared": read_manifest(config.bundle).shared, "weights": result["weights"]}
        add_composition(config.bundle, config.name, result["weights"], config.mode, config.task, report)
        write_json_atomic(Path(config.report), report)
        return result["weights"]
    return search


def run(variants: list[str], tasks: list[str], bundles: dict[str, Path], residual_out: Path, out: Path,
        objective: str, student: str | None = None, budget: int = 40, search: Search = search_offline) -> list[dict]:
    """Search every missing composition; returns one record per composition searched."""
    done = []
    for task in tasks:
        shots = write_shots(residual_out, task, out)
        for variant, bundle, name, mode in missing(variants, [task], bundles):
            started = time.perf_counter()
            weights = search(ComposeConfig(task=task, bundle=str(bundle), student=student, name=name,
                                           shots_file=str(shots), mode=mode, objective=objective, budget=budget,
                                           max_length=MAX_LENGTH,
                                           report=str(out / "reports" / f"{VARIANTS[variant][0]}-{name}.json")))
            record = {"task": task, "variant": variant, "objective": objective, "weights": weights,
                      "seconds": round(time.perf_counter() - started)}
            print(f"[seen] {task} {variant}: {json.dumps(record)}", flush=True)
            done.append(record)
    return done


def missing(variants: list[str], tasks: list[str], bundles: dict[str, Path]) -> list[tuple[str, Path, str, str]]:
    """(variant, bundle, composition name, mode) of every composition not yet recorded in an existing bundle."""
    todo = []
    for task in tasks:
        for variant in variants:
            key, mode = VARIANTS[variant]
            bundle, name = bundles[key], composition_name(task, mode)
            if (bundle / "manifest.json").is_file() and name not in read_manifest(bundle).compositions:
                todo.append((variant, bundle, name, mode))
    return todo


@contextlib.contextmanager
def servers_for(bundles: list[Path], serve_args: list[str], log_dir: Path) -> Iterator[dict[str, str]]:
    """One `mode-cotd serve` per bundle, runtime routes on in a throwaway state folder; {bundle: base URL}."""
    from benchmarks.servers import mode_cotd_spec, running

    with tempfile.TemporaryDirectory(prefix="mode-cotd-seen-") as tmp, contextlib.ExitStack() as stack:
        urls = {}
        for i, bundle in enumerate(bundles):
            spec = mode_cotd_spec(Path(tmp) / f"composites-{i}", bundle=bundle, extra_args=[
                "--runtime-enabled", "--runtime-state-dir", str(Path(tmp) / f"state-{i}"), *serve_args])
            urls[str(bundle)] = stack.enter_context(running(spec, log_dir)).base_url
        yield urls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tasks", nargs="*", default=list(SEEN_TASKS))
    parser.add_argument("--objective", choices=OBJECTIVES, default=None,
                        help="default: the objective study's winner, else few_shot_loss")
    parser.add_argument("--out", type=Path, default=Path("training/recipes/results/seen_compositions"))
    parser.add_argument("--residual-out", type=Path, default=Path("training/recipes/results/residual"))
    parser.add_argument("--study-out", type=Path, default=Path("training/recipes/results/objectives"))
    parser.add_argument("--residual-bundle", type=Path, default=Path("bundles/residual"))
    parser.add_argument("--default-bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument("--student", default=None)
    parser.add_argument("--scorer", choices=("server", "offline"), default="server")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="one more `mode-cotd serve` argument for the server scorer, repeatable")
    args = parser.parse_args(argv)
    objective = chosen_objective(args.study_out, args.objective)
    print(f"[seen] objective: {objective}, scorer: {args.scorer}", flush=True)
    bundles = {"residual": args.residual_bundle, "default": args.default_bundle}
    if args.scorer == "offline":
        run(args.variants, args.tasks, bundles, args.residual_out, args.out, objective, args.student)
        return 0
    if objective not in SERVER_OBJECTIVES:
        raise SystemExit(f"the server scorer runs {list(SERVER_OBJECTIVES)}, not {objective!r}: use --scorer offline")
    if args.student is not None:
        args.serve_arg += ["--student", args.student]
    for key, bundle in bundles.items():  # one server at a time: two engines do not fit beside each other here
        variants = [v for v in args.variants if VARIANTS[v][0] == key]
        if not missing(variants, args.tasks, bundles):
            continue
        with servers_for([bundle], args.serve_arg, args.out / "logs") as urls:
            run(variants, args.tasks, bundles, args.residual_out, args.out, objective, args.student,
                search=search_on_server(urls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
