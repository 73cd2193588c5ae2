"""Residual experts over the shared all_data adapter: the recipe chosen by validation accuracy, then ten experts.

Experts trained against the bare student do not stack on all_data (issue 27: the sum of all_data and a
task's own expert lost 8 points to all_data alone). A residual expert is trained with all_data merged
into the student and frozen underneath (``DistillConfig.shared_adapter``), and is served on top of it:
student + all_data + the residual (exact, one union of ranks).

Stages, each resumable (distillation checkpoints in the cache, finished units skipped, every unit
written atomically), each a plain call of the project's own training and evaluation code:

  split    per seen task, a seeded validation set of the train file (VAL_FRACTION, at most VAL_MAX),
           taken where possible from examples all_data did not train on (aqua, commonsense_qa and
           gsm8k have 3-5k rationales; all_data saw a seeded 1,000 of each); the rest is the residual
           training pool, capped at TRAIN_CAP (examples all_data did not see first). Never a test file.
  sweep    each SWEEP_CANDIDATES recipe (rank, learning rate, epochs) trained as a residual on
           SWEEP_TASKS, whose validation prompts all_data never saw; chosen by the greedy accuracy of
           all_data + residual on those prompts (vLLM, the paper's scoring), against all_data alone.
  experts  the ten residual experts with the chosen recipe into ``bundles/residual`` (all_data copied
           in and marked as the shared adapter, `manifest.shared`; the sweep tasks' winners are reused, not
           retrained; the default bundle's gate, whose experts have the same names, routes them).
  abstain  the gate's abstention threshold (training/abstention.py): all_data alone and all_data + the
           gate's residual mixture on the validation prompts all_data never trained on (aqua,
           commonsense_qa, gsm8k: the other tasks' validation examples were in all_data's training
           set, which would favour it), and the gate's top probability on each; the calibrated τ is
           written into the bundle's gate (abstain_below, abstain_to = all_data).

    python -m training.recipes.residual_experts --stage split|sweep|experts|abstain|all [--out DIR]

The default --out, training/recipes/results/residual/, is committed (the split's sizes, the sweep's experts,
validation units and choice), so a later session resumes where one stopped; its data/ (regenerated from the
seeded split) and adapters/ (composites) are not.

Every stage prints progress with flush; run it in the background with a log, e.g.
``nohup nice -n 10 .venv/bin/python -m training.recipes.residual_experts > runs/residual.log 2>&1 &``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mode_cotd.atomic import write_json_atomic
from mode_cotd.bundle import (
    MANIFEST,
    add_expert,
    create_bundle,
    load_bundle,
    read_manifest,
    set_gate,
    set_shared,
)
from mode_cotd.data import load_examples, load_task, student_prompt, write_jsonl
from mode_cotd.featurise import make_featuriser
from mode_cotd.format import completion_prompt
from mode_cotd.student import resolve_student, student_identity
from mode_cotd.tasks import SEEN_TASKS, get_task, is_correct
from training.abstention import calibrate_abstention
from training.distill import DistillConfig, distill
from training.evaluate import EvalConfig, EvalItem, VllmGenerator, summarise, too_long
from training.gate import featurise
from training.routes import RoutePlanner, parse_route

SHARED = "all_data"
"""Name of the shared adapter in the bundles this recipe writes."""
SHARED_SUBSAMPLE = (1000, 0)
"""(size, seed) of all_data's per-task subsample (training/recipes/default_bundle.py): the examples it saw."""
VAL_FRACTION, VAL_MAX = 0.2, 100
"""Validation share of each seen task's train rationales, and its cap."""
TRAIN_CAP = 300
"""Most residual training examples per task (drawn with seed 1)."""
SWEEP_TASKS = ("commonsense_qa",)
"""Seen tasks whose validation prompts all_data never trained on, and on which it scores above 0. aqua was the
second until 2026-12-06: its three candidates would cost about 2.5 h of this 2-core CPU, against about 3.5-7 h for
all ten experts, so the recipe is chosen on commonsense_qa's 100 validation prompts alone."""
SWEEP_CANDIDATES = {
    "r8-lr2e-4-e2": {"r": 8, "lora_alpha": 16, "lr": 2e-4, "epochs": 2},
    "r16-lr5e-4-e2": {"r": 16, "lora_alpha": 32, "lr": 5e-4, "epochs": 2},
    "r16-lr5e-4-e4": {"r": 16, "lora_alpha": 32, "lr": 5e-4, "epochs": 4},
}
"""Residual recipes tried: a gentle one, the calibration expert's rank and rate, and all_data's epochs."""
COMMON = {"batch_size": 16, "lora_dropout": 0.1, "max_length": 512, "seed": 0, "progress": False,
          "target_modules": "all-linear", "checkpoint_every": 5}
"""Settings shared by every residual (all_data's shape, batch and length; a checkpoint every 5 steps, so that a
stopped session loses minutes, not an expert)."""
EXPERTS_AUTOCAST = "bfloat16"
"""The experts stage trains under bf16 autocast (DistillConfig.autocast: 11-12 s against 20 s a step on this CPU
with AVX512-BF16); the sweep's candidates, and so the reused commonsense_qa winner, trained in float32."""


@dataclass(frozen=True)
class Split:
    """One seen task's residual training pool and validation set (example indices of its train file)."""

    task: str
    train: list[int]
    val: list[int]
    val_unseen_by_shared: bool


def split_task(task: str, n: int) -> Split:
    """The seeded split of a train file of ``n`` rationales (see the module docstring)."""
    size, seed = SHARED_SUBSAMPLE
    seen = set(random.Random(seed).sample(range(n), size)) if size < n else set(range(n))
    unseen = [i for i in range(n) if i not in seen]
    n_val = min(VAL_MAX, round(n * VAL_FRACTION))
    pool = unseen if len(unseen) >= n_val else list(range(n))
    val = sorted(random.Random(seed).sample(pool, n_val))
    rest = [i for i in range(n) if i not in set(val)]
    fresh = [i for i in rest if i not in seen]
    ordered = fresh if len(fresh) >= TRAIN_CAP else rest
    train = sorted(random.Random(1).sample(ordered, min(TRAIN_CAP, len(ordered))))
    return Split(task, train, val, val_unseen_by_shared=pool is unseen)


def split(out: Path) -> dict[str, Split]:
    """Write <out>/data/<task>.train.jsonl and .val.jsonl for every seen task; the splits."""
    splits = {}
    for task in SEEN_TASKS:
        examples = [e for e in load_task(task, "train") if e.rationale is not None]
        s = split_task(task, len(examples))
        for part in ("train", "val"):
            path = out / "data" / f"{task}.{part}.jsonl"
            if not path.is_file():
                write_jsonl(path, [examples[i] for i in getattr(s, part)])
        splits[task] = s
    write_json_atomic(out / "split.json", {t: {"train": len(s.train), "val": len(s.val),
                                               "val_unseen_by_shared": s.val_unseen_by_shared}
                                           for t, s in splits.items()})
    return splits


def new_bundle(root: Path, shared_dir: Path, student: Path) -> None:
    """A bundle for ``student`` holding the shared adapter as expert SHARED (kept when it exists)."""

    if not (root / MANIFEST).is_file():
        create_bundle(root, student_identity(student))
    if not (root / "experts" / SHARED / "adapter_model.safetensors").is_file():
        report = json.loads((shared_dir / "report.json").read_text()) if (shared_dir / "report.json").is_file() else None
        add_expert(root, SHARED, shared_dir, SHARED, report)


def train_residual(out: Path, bundle: Path, task: str, name: str, recipe: dict, student: Path, shared_dir: Path) -> dict:
    """Distil one residual expert ``name`` for ``task`` into ``bundle`` (skipped when it is there)."""
    if (bundle / "experts" / name / "adapter_model.safetensors").is_file():
        return {"expert_dir": str(bundle / "experts" / name), "skipped": True}
    started = time.perf_counter()
    result = distill(DistillConfig(task=task, expert=name, student=str(student), bundle=str(bundle),
                                   train_file=str(out / "data" / f"{task}.train.jsonl"),
                                   shared_adapter=str(shared_dir), **{**COMMON, **recipe}))
    report = result.report
    print(f"[residual] {name}: {report['steps']} steps, final loss {report['final_loss']:.4f}, "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return {"expert_dir": str(result.expert_dir), "final_loss": report["final_loss"], "steps": report["steps"],
            "seconds": time.perf_counter() - started}


def val_items(out: Path, task: str) -> list:
    """The task's validation prompts, as evaluation items (index = position in the val file)."""

    examples = load_examples(out / "data" / f"{task}.val.jsonl", task)
    return [EvalItem(task, i, completion_prompt(student_prompt(e)), e.gold) for i, e in enumerate(examples)]


def val_accuracy(out: Path, bundle: Path, student: Path, units: dict[str, tuple[str, str]]) -> None:
    """Greedy validation accuracy of each pending unit {slug: (task, route)}; one file per unit in <out>/val/."""
    pending = {slug: u for slug, u in units.items() if not (out / "val" / f"{slug}.json").is_file()}
    if not pending:
        return
    planner = RoutePlanner(load_bundle(bundle, student=student, strict=True), student, out / "adapters")
    prompts, choices, spans = [], [], {}
    for slug, (task, route) in pending.items():
        items = val_items(out, task)
        spans[slug] = (len(prompts), items, route)
        prompts += [i.prompt for i in items]
        choices += planner.plan(parse_route(route), [i.prompt for i in items], [task] * len(items))
    engine = EvalConfig(bundle=None, dtype="float32", max_loras=8)
    skipped = too_long(student, prompts, engine.max_model_len)
    kept = [i for i in range(len(prompts)) if i not in skipped]
    max_rank = max((c.rank for c in choices if c is not None), default=1)
    generator = VllmGenerator(student, engine, max_rank, len({c.name for c in choices if c is not None}))
    try:
        started = time.perf_counter()
        texts = [""] * len(prompts)  # a prompt too long for the context scores as wrong (summarise's too_long)
        for i, text in zip(kept, generator([prompts[i] for i in kept], [choices[i] for i in kept])):
            texts[i] = text
        print(f"[val] {len(prompts)} prompts in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        generator.close()
    for slug, (offset, items, route) in spans.items():
        predictions = texts[offset:offset + len(items)]
        long_ones = {i for i in range(len(items)) if offset + i in skipped}
        summary = summarise(items, predictions, long_ones)["tasks"][items[0].task]
        write_json_atomic(out / "val" / f"{slug}.json", {
            "task": items[0].task, "route": route, **summary,
            "examples": [{"index": it.index, "gold": it.gold, "prediction": p} for it, p in zip(items, predictions)]})
        print(f"[val] {slug}: {summary['accuracy']:.3f} ({summary['correct']}/{summary['n']})", flush=True)


def sweep(out: Path, student: Path, shared_dir: Path) -> dict:
    """Train every candidate on the sweep tasks; choose by mean validation accuracy of all_data + residual."""
    bundle = out / "sweep-bundle"
    new_bundle(bundle, shared_dir, student)
    runs = {}
    for task in SWEEP_TASKS:
        for cand, recipe in SWEEP_CANDIDATES.items():
            runs[f"{task}--{cand}"] = train_residual(out, bundle, task, f"{task}--{cand}", recipe, student, shared_dir)
    units = {f"{task}--{SHARED}": (task, f"expert:{SHARED}") for task in SWEEP_TASKS}
    units |= {f"{task}--{cand}": (task, "mixture:" + json.dumps({SHARED: 1.0, f"{task}--{cand}": 1.0}))
              for task in SWEEP_TASKS for cand in SWEEP_CANDIDATES}
    val_accuracy(out, bundle, student, units)
    acc = {slug: json.loads((out / "val" / f"{slug}.json").read_text())["accuracy"] for slug in units}
    means = {name: sum(acc[f"{t}--{name}"] for t in SWEEP_TASKS) / len(SWEEP_TASKS)
             for name in [SHARED, *SWEEP_CANDIDATES]}
    best = max(SWEEP_CANDIDATES, key=lambda c: (means[c], -list(SWEEP_CANDIDATES).index(c)))
    choice = {"candidate": best, **SWEEP_CANDIDATES[best], "mean_val_accuracy": means, "val_accuracy": acc,
              "beats_shared_only": means[best] > means[SHARED], "tasks": list(SWEEP_TASKS),
              "val_prompts": {t: len(val_items(out, t)) for t in SWEEP_TASKS}, "runs": runs}
    write_json_atomic(out / "choice.json", choice)
    print(f"[sweep] chose {best}: mean val accuracy {means[best]:.3f} against {means[SHARED]:.3f} for "
          f"{SHARED} alone", flush=True)
    return choice


def experts(out: Path, bundle: Path, student: Path, shared_dir: Path, choice: dict, gate_bundle: Path) -> None:
    """The ten residual experts with the chosen recipe into ``bundle``; the sweep's winners are copied. Then the
    bundle is marked as served over its shared adapter, and gets the gate of ``gate_bundle`` (its experts have the
    residuals' names: the gate routes a prompt to its task, whichever bundle serves the task)."""
    new_bundle(bundle, shared_dir, student)
    recipe = {k: choice[k] for k in ("r", "lora_alpha", "lr", "epochs")}
    for task in SEEN_TASKS:
        done = bundle / "experts" / task / "adapter_model.safetensors"
        winner = out / "sweep-bundle" / "experts" / f"{task}--{choice['candidate']}"
        if not done.is_file() and winner.is_dir():
            add_expert(bundle, task, winner, task, json.loads((winner / "report.json").read_text()))
            print(f"[experts] {task}: the sweep's winner copied", flush=True)
            continue
        train_residual(out, bundle, task, task, {**recipe, "autocast": EXPERTS_AUTOCAST}, student, shared_dir)
    set_shared(bundle, SHARED)
    if read_manifest(bundle).gate is None:
        source = load_bundle(gate_bundle, student=student, strict=True)
        if source.gate is None or sorted(source.gate.config.experts) != sorted(SEEN_TASKS):
            raise SystemExit(f"{gate_bundle}: no gate over the ten seen tasks to route the residual experts")
        report = json.loads((gate_bundle / "reports" / "gate.json").read_text()) \
            if (gate_bundle / "reports" / "gate.json").is_file() else None
        set_gate(bundle, source.gate, {"copied_from": str(gate_bundle), "report": report})
        print(f"[experts] the gate of {gate_bundle} routes the residual experts", flush=True)


def abstain(out: Path, bundle: Path, student: Path) -> dict:
    """Calibrate the residual bundle's gate abstention on the validation prompts all_data never saw; write
    <out>/abstention.json and the threshold into the bundle's gate (see the module docstring)."""
    sizes = json.loads((out / "split.json").read_text())
    tasks = [t for t in SEEN_TASKS if sizes[t]["val_unseen_by_shared"]]
    units = {f"{t}--{SHARED}": (t, f"expert:{SHARED}") for t in tasks} | {f"{t}--gate": (t, "gate") for t in tasks}
    gate_units = [u for u in units if u.endswith("--gate") and not (out / "val" / f"{u}.json").is_file()]
    loaded = load_bundle(bundle, student=student, strict=True)
    if gate_units and loaded.gate.config.abstain_below > 0:
        raise SystemExit(f"{bundle}: its gate abstains already; reset it (abstain_below 0) to calibrate again")
    val_accuracy(out, bundle, student, units)
    featuriser = make_featuriser(loaded.gate.config.featuriser, student)
    probs, shared_ok, gate_ok = [], [], []
    for task in tasks:
        prompts = [i.prompt for i in val_items(out, task)]
        probs += loaded.gate.probabilities(featurise(featuriser, prompts)).max(1).values.tolist()
        for route, outcomes in ((SHARED, shared_ok), ("gate", gate_ok)):
            examples = json.loads((out / "val" / f"{task}--{route}.json").read_text())["examples"]
            outcomes += [is_correct(e["prediction"], e["gold"], get_task(task)) for e in examples]
    calibration = calibrate_abstention(probs, shared_ok, gate_ok)
    result = {**calibration.to_dict(), "tasks": tasks, "shared": SHARED}
    write_json_atomic(out / "abstention.json", result)
    gate = loaded.gate
    gate.config.abstain_below, gate.config.abstain_to = calibration.abstain_below, SHARED
    set_gate(bundle, gate, {**(read_manifest(bundle).gate.report or {}), "abstention": result})
    print(f"[abstain] tau {calibration.abstain_below:.4f}: {calibration.abstained}/{calibration.n} prompts to "
          f"{SHARED} alone; accuracy {calibration.accuracy:.3f} (gate always {calibration.gate_accuracy:.3f}, "
          f"{SHARED} always {calibration.shared_accuracy:.3f})", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("split", "sweep", "experts", "abstain", "all"), default="all")
    parser.add_argument("--student", default=None, help="student folder (default: the converted default student)")
    parser.add_argument("--out", type=Path, default=Path("training/recipes/results/residual"),
                        help="split, sweep experts, validation units and the choice (committed)")
    parser.add_argument("--shared", type=Path, default=Path("bundles/all_data/experts/all_data"),
                        help="the shared adapter the residuals are trained over")
    parser.add_argument("--bundle", type=Path, default=Path("bundles/residual"))
    parser.add_argument("--gate-bundle", type=Path, default=Path("bundles/default"),
                        help="the bundle whose gate (over the ten seen tasks) routes the residual experts")
    args = parser.parse_args(argv)
    student = resolve_student(args.student)
    args.out.mkdir(parents=True, exist_ok=True)
    split(args.out)
    if args.stage in ("sweep", "all"):
        sweep(args.out, student, args.shared)
    if args.stage in ("experts", "all"):
        choice_path = args.out / "choice.json"
        if not choice_path.is_file():
            print(f"no {choice_path}: run --stage sweep first", file=sys.stderr)
            return 2
        experts(args.out, args.bundle, student, args.shared, json.loads(choice_path.read_text()), args.gate_bundle)
    if args.stage in ("abstain", "all") and not (args.out / "abstention.json").is_file():
        abstain(args.out, args.bundle, student)
    return 0


if __name__ == "__main__":
    sys.exit(main())
