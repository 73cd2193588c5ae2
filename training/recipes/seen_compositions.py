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

    python -m training.recipes.seen_compositions [--variants residual-exact ...] [--tasks ...] [--objective ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mode_cotd.bundle import read_manifest
from mode_cotd.data import load_examples, write_jsonl
from mode_cotd.tasks import SEEN_TASKS
from training.compose import ComposeConfig, compose
from training.objectives import OBJECTIVES

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


def run(variants: list[str], tasks: list[str], bundles: dict[str, Path], residual_out: Path, out: Path,
        objective: str, student: str | None = None, budget: int = 40) -> list[dict]:
    """Search every missing composition; returns one record per composition searched."""
    done = []
    for task in tasks:
        shots = write_shots(residual_out, task, out)
        for variant in variants:
            key, mode = VARIANTS[variant]
            bundle, name = bundles[key], composition_name(task, mode)
            if not (bundle / "manifest.json").is_file() or name in read_manifest(bundle).compositions:
                continue
            started = time.perf_counter()
            result = compose(ComposeConfig(task=task, bundle=str(bundle), student=student, name=name,
                                           shots_file=str(shots), mode=mode, objective=objective, budget=budget,
                                           max_length=MAX_LENGTH,
                                           report=str(out / "reports" / f"{key}-{name}.json")))
            record = {"task": task, "variant": variant, "objective": objective, "weights": result.weights,
                      "seconds": round(time.perf_counter() - started)}
            print(f"[seen] {task} {variant}: {json.dumps(record)}", flush=True)
            done.append(record)
    return done


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
    args = parser.parse_args(argv)
    objective = chosen_objective(args.study_out, args.objective)
    print(f"[seen] objective: {objective}", flush=True)
    run(args.variants, args.tasks, {"residual": args.residual_bundle, "default": args.default_bundle},
        args.residual_out, args.out, objective, args.student)
    return 0


if __name__ == "__main__":
    sys.exit(main())
