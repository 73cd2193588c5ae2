"""Which composition objective predicts accuracy: few-shot loss, answer-token loss or shot error (issue 27).

For each seen task T, treated as unseen: its validation split of the train file (the residual recipe's
<residual>/data/T.val.jsonl; never a test file) gives SHOTS shots (its first examples with a rationale)
and up to HELD_OUT further prompts. The candidates are the default bundle's experts other than T's own.
For each candidate:

  - the three objectives on the shots (training/objectives.py): the two losses through peft, the shot
    error from vLLM's greedy generations (the same engine and scoring as the held-out prompts);
  - its greedy accuracy on the held-out prompts (vLLM, 256 new tokens, stop at " END").

Per task and objective: Spearman's correlation of -objective with accuracy, and the regret of the
objective's pick (training/rank_agreement.py). The objective with the highest mean correlation over the
tasks (mean regret breaks ties) is the one that transfers; `summary.json` says which.

Resumable: one unit per task, <out>/units/<task>.json, written atomically; a rerun skips finished ones.

    python -m training.recipes.objective_study run     [--out DIR] [--tasks ...]
    python -m training.recipes.objective_study summary [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mode_cotd.atomic import write_json_atomic, write_text_atomic
from mode_cotd.bundle import load_bundle
from mode_cotd.data import load_examples, student_prompt
from mode_cotd.format import completion_prompt
from mode_cotd.student import resolve_student
from mode_cotd.tasks import SEEN_TASKS, get_task, is_correct
from training.compose import ExactMixer, mixed_student, write_lora
from training.evaluate import EvalConfig, VllmGenerator
from training.objectives import OBJECTIVES, TokenLoss
from training.rank_agreement import regret, spearman
from training.routes import RoutePlanner, parse_route

SHOTS, HELD_OUT = 5, 40
"""Shots per task (the objectives' data), and the most held-out validation prompts (the accuracy's)."""
MAX_PROMPT_TOKENS = 1024 - 256
"""Longest prompt kept: the evaluation's context (1,024) less its 256 new tokens."""


def task_data(residual_out: Path, task: str, tokenizer) -> tuple[list, list]:
    """(shots, held-out examples) of the task's validation split; prompts too long for the context dropped."""
    examples = load_examples(residual_out / "data" / f"{task}.val.jsonl", task)
    fits = [e for e in examples
            if len(tokenizer(completion_prompt(student_prompt(e)))["input_ids"]) <= MAX_PROMPT_TOKENS]
    shots = [e for e in fits if e.rationale][:SHOTS]
    held_out = [e for e in fits if e not in shots][:HELD_OUT]
    return shots, held_out


def losses(peft_model, tokenizer, adapters: dict, shots: list) -> dict[str, dict[str, float]]:
    """{candidate: {few_shot_loss, answer_loss}} with each candidate written into `peft_model` in turn."""
    out = {}
    measures = {"few_shot_loss": TokenLoss(peft_model, tokenizer, shots, 1024, SHOTS, "cpu"),
                "answer_loss": TokenLoss(peft_model, tokenizer, shots, 1024, SHOTS, "cpu", answer_only=True)}
    for name, adapter in adapters.items():
        write_lora(peft_model, ExactMixer([adapter]).tensors([1.0]))
        out[name] = {objective: measure() for objective, measure in measures.items()}
    return out


def run_task(task: str, bundle_dir: Path, residual_out: Path, student: Path, out: Path) -> dict:
    """One unit: every candidate's objectives on the shots and accuracy on the held-out prompts."""
    started = time.perf_counter()
    bundle = load_bundle(bundle_dir, student=student, strict=True)
    candidates = sorted(n for n, e in bundle.experts.items() if e.record.task != task)
    adapters = {n: bundle.experts[n].load() for n in candidates}
    peft_model, tokenizer = mixed_student(student, ExactMixer([adapters[candidates[0]]]).initial(), "float32", "cpu")
    shots, held_out = task_data(residual_out, task, tokenizer)
    per_candidate = losses(peft_model, tokenizer, adapters, shots)
    del peft_model

    planner = RoutePlanner(bundle, student, out / "adapters")
    prompts, choices, spans = [], [], {}
    for name in candidates:
        rows = shots + held_out
        spans[name] = len(prompts)
        prompts += [completion_prompt(student_prompt(e)) for e in rows]
        choices += planner.plan(parse_route(f"expert:{name}"), prompts[-len(rows):], [task] * len(rows))
    engine = EvalConfig(bundle=None, dtype="float32", max_loras=8, kv_cache_memory_bytes=1 << 30)  # beside training
    generator = VllmGenerator(student, engine,
                              max(c.rank for c in choices), len(candidates))
    try:
        texts = generator(prompts, choices)
    finally:
        generator.close()
    kind = get_task(task)
    for name in candidates:
        start = spans[name]
        right = [is_correct(t, e.gold, kind) for t, e in zip(texts[start:start + len(shots) + len(held_out)],
                                                              shots + held_out)]
        per_candidate[name]["shot_error"] = 1 - sum(right[:len(shots)]) / len(shots)
        per_candidate[name]["accuracy"] = sum(right[len(shots):]) / len(held_out)
    unit = {"task": task, "shots": len(shots), "held_out": len(held_out), "candidates": per_candidate,
            "agreement": agreement(per_candidate), "seconds": round(time.perf_counter() - started, 1)}
    write_json_atomic(out / "units" / f"{task}.json", unit)
    return unit


def agreement(per_candidate: dict[str, dict[str, float]]) -> dict[str, dict]:
    """{objective: {spearman (of -objective with accuracy), regret}} over the candidates."""
    names = sorted(per_candidate)
    accuracy = [per_candidate[n]["accuracy"] for n in names]
    result = {}
    for objective in OBJECTIVES:
        values = [per_candidate[n][objective] for n in names]
        result[objective] = {"spearman": spearman([-v for v in values], accuracy), "regret": regret(values, accuracy),
                             "pick": names[min(range(len(names)), key=lambda i: values[i])]}
    return result


def summary(out: Path) -> dict:
    """Mean correlation and regret per objective over the finished units; the winner."""
    units = [json.loads(p.read_text()) for p in sorted((out / "units").glob("*.json"))]
    if not units:
        raise SystemExit(f"no units in {out / 'units'}: run first")
    table = {}
    for objective in OBJECTIVES:
        rhos = [u["agreement"][objective]["spearman"] for u in units if u["agreement"][objective]["spearman"]
                is not None]
        regrets = [u["agreement"][objective]["regret"] for u in units]
        table[objective] = {"mean_spearman": sum(rhos) / len(rhos) if rhos else None, "tasks_ranked": len(rhos),
                            "mean_regret": sum(regrets) / len(regrets)}
    best = max(OBJECTIVES, key=lambda o: (table[o]["mean_spearman"] if table[o]["mean_spearman"] is not None
                                          else -2, -table[o]["mean_regret"]))
    result = {"tasks": [u["task"] for u in units], "objectives": table, "best": best}
    write_json_atomic(out / "summary.json", result)
    write_text_atomic(out / "table.md", markdown(units, table))
    return result


def markdown(units: list[dict], table: dict) -> str:
    """Per task: each objective's Spearman ρ with held-out accuracy and its regret (points); then the means."""
    def rho(value):
        return "–" if value is None else f"{value:+.2f}"

    head = " | ".join(f"{o}: ρ, regret" for o in OBJECTIVES)
    lines = [f"| task | held-out prompts | {head} |", "|---|---|" + "---|" * len(OBJECTIVES)]
    for u in units:
        cells = [f"{rho(u['agreement'][o]['spearman'])}, {100 * u['agreement'][o]['regret']:.1f}" for o in OBJECTIVES]
        lines.append(f"| {u['task']} | {u['held_out']} | " + " | ".join(cells) + " |")
    means = [f"{rho(table[o]['mean_spearman'])}, {100 * table[o]['mean_regret']:.1f}" for o in OBJECTIVES]
    lines.append(f"| **mean** ({len(units)} tasks) | | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "summary"))
    parser.add_argument("--out", type=Path, default=Path("training/recipes/results/objectives"))
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"), help="the candidates' bundle")
    parser.add_argument("--residual-out", type=Path, default=Path("training/recipes/results/residual"),
                        help="the residual recipe's folder, whose data/<task>.val.jsonl are the validation splits")
    parser.add_argument("--tasks", nargs="*", default=list(SEEN_TASKS))
    parser.add_argument("--student", default=None)
    args = parser.parse_args(argv)
    if args.command == "run":
        student = resolve_student(args.student)
        for task in args.tasks:
            if (args.out / "units" / f"{task}.json").is_file():
                continue
            unit = run_task(task, args.bundle, args.residual_out, student, args.out)
            print(f"[objectives] {task}: {json.dumps(unit['agreement'])} ({unit['seconds']:.0f} s)", flush=True)
    print(json.dumps(summary(args.out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
