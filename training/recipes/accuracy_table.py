"""The seen/unseen accuracy table of the default bundle: every route of the paper's comparison, resumable.

    python -m training.recipes.accuracy_table [--max-examples 100] [--out benchmarks/results/accuracy]

Work is cut into units, one (route, task) each, so that a long CPU run can stop and go on:

    base                        the frozen student, every task
    expert:<task>               each seen task's own expert (oracle routing), its task
    gate                        the bundle's gate (top-k mixture per prompt), every task
    composition:<t>             exact composition found for unseen task t from its few shots, on t
    composition:<t>-linear      the paper's linear composition for t, on t
    all_data:expert:all_data    one LoRA trained on all seen tasks together (bundles/all_data), every task
    expert:<e>                  every seen expert on every unseen task (the best single expert is their max)

Test prompts are the seeded subsample of `training.evaluate.eval_items` (`max_examples` per task;
tasks with fewer are used whole). Generation is vLLM's offline batched greedy decoding
(`training.evaluate.VllmGenerator`), scoring `mode_cotd.tasks.score`, as `mode-cotd eval`.
Units run in chunks of about `chunk_prompts` prompts (one `generate` call each); each finished
unit is written atomically to ``<out>/units/<slug>.json`` (its predictions, adapters and score)
and skipped when the run starts again. Units whose adapters need a LoRA rank above 16 (the
exact compositions, rank Σrᵢ) run first, in an engine of their own: every slot is padded to the
engine's max rank, and the r8 experts would otherwise pay for it. ``table`` then assembles
``<out>/accuracy.json`` and ``<out>/table.md`` from the unit files alone.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch

from mode_cotd.atomic import write_json_atomic, write_text_atomic
from mode_cotd.bundle import Bundle, load_bundle
from mode_cotd.data import subsample
from mode_cotd.settings import parse_settings
from mode_cotd.student import resolve_student, student_identity
from mode_cotd.tasks import SEEN_TASKS, UNSEEN_TASKS, get_task, is_correct, score
from training.compose import ComposeConfig, ExactMixer, load_shots, mixed_student, write_lora
from training.evaluate import EvalConfig, VllmGenerator, eval_items, summarise, too_long
from training.objectives import TokenLoss
from training.routes import RoutePlanner, parse_route

C = TypeVar("C", bound="TableConfig")

LOW_RANK = 16
"""Units whose adapters all have rank <= this share the first engine."""


@dataclass
class TableConfig:
    """Settings of the accuracy table run."""

    bundle: str = "bundles/default"
    """The served bundle: experts, gate, compositions."""
    all_data_bundle: str = "bundles/all_data"
    """Bundle holding the all_data baseline expert; missing: its units are left for a later run."""
    out: str = "benchmarks/results/accuracy"
    """Unit files, accuracy.json and table.md."""
    max_examples: int = 100
    """Test examples per task (seeded subsample): the pool."""
    keep_examples: int | None = 50
    """Examples per task actually run: a seeded subsample of the pool (None: the whole pool). Units
    written from a larger pool are restricted to this subset and re-scored (`restrict_units`)."""
    seed: int = 0
    """Seed of the subsample and of vLLM."""
    max_new_tokens: int = 256
    """Most generated tokens per prompt (the longest train rationale is 258 tokens; p95 <= 165)."""
    max_model_len: int = 1024
    """vLLM context; longer prompts are scored wrong and counted as too_long."""
    dtype: str = "float32"
    """vLLM dtype; float32 because this CPU has no native bf16 (bf16 decodes ~3x slower here)."""
    max_num_seqs: int = 64
    """Sequences per vLLM batch."""
    max_loras: int = 16
    """vLLM LoRA slots (the gate route uses many distinct top-2 mixtures)."""
    chunk_prompts: int = 300
    """Units are generated together until a chunk holds at least this many prompts."""
    routes: list[str] | None = None
    """Only units of these routes (labels as in the unit list); None: all."""
    tasks: list[str] | None = None
    """Only units on these tasks; None: all 14. With `routes`, reruns one unit into another --out to
    check it reproduces."""


@dataclass(frozen=True)
class Unit:
    """One route on one task."""

    route: str
    """Route text for training.routes.parse_route."""
    task: str
    """The test set."""
    bundle: str = "default"
    """Key of the bundle the route reads ("default", "all_data", or another run's own)."""
    column: str | None = None
    """The table column this unit fills, when it is not the label (a route that differs per task)."""

    @property
    def label(self) -> str:
        if self.column is not None:
            return self.column
        return self.route if self.bundle == "default" else f"{self.bundle}:{self.route}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.label}__{self.task}")


def all_units(seen: Sequence[str], unseen: Sequence[str], experts: Sequence[str],
              compositions: Sequence[str], chosen: dict[str, str] | None = None) -> list[Unit]:
    """Every unit of the table, in the order they run (the comparisons that matter most first).

    ``chosen``: unseen task -> the single expert picked by its few-shot loss (see `choose_experts`);
    those units run before the other single experts."""
    tasks = [*seen, *unseen]
    units = [Unit("base", t) for t in tasks]
    units += [Unit(f"expert:{t}", t) for t in seen if t in experts]
    units += [Unit("gate", t) for t in tasks]
    for t in unseen:
        units += [Unit(f"composition:{name}", t) for name in (t, f"{t}-linear") if name in compositions]
    units += [Unit("expert:all_data", t, bundle="all_data") for t in tasks]
    singles = [Unit(f"expert:{e}", t) for t in unseen for e in experts]
    first = [u for u in singles if (chosen or {}).get(u.task) == u.route.split(":", 1)[1]]
    return units + first + [u for u in singles if u not in first]


def choose_experts(bundle_root: str, out: Path) -> dict[str, str]:
    """Unseen task -> the one expert with the lowest loss on the task's few shots (the shots the
    compositions were searched on; never the test set). Written to ``<out>/single_expert_choice.json``."""
    path = out / "single_expert_choice.json"
    if path.is_file():
        return {t: v["expert"] for t, v in json.loads(path.read_text()).items()}
    student = resolve_student(None)
    bundle = load_bundle(bundle_root, student=student, strict=True)
    names = list(bundle.experts)
    mixer = ExactMixer([bundle.experts[n].load() for n in names])
    model, tokenizer = mixed_student(student, mixer.initial(), "float32", "cpu")
    report = {}
    for task in UNSEEN_TASKS:
        shots, source = load_shots(ComposeConfig(task=task, bundle=bundle_root))
        loss = TokenLoss(model, tokenizer, shots, 512, 5, "cpu")
        losses = {}
        for i, name in enumerate(names):
            write_lora(model, mixer.tensors([float(j == i) for j in range(len(names))]))  # expert i alone
            with torch.no_grad():
                losses[name] = loss()
        best = min(losses, key=losses.get)
        report[task] = {"expert": best, "shot_losses": losses, "shots": source}
        print(f"[table] {task}: single expert by few-shot loss: {best} ({losses[best]:.4f})", flush=True)
    write_json_atomic(path, report)
    return {t: v["expert"] for t, v in report.items()}


def unit_path(out: Path, unit: Unit) -> Path:
    return out / "units" / f"{unit.slug}.json"


# ----------------------------------------------------------------------------- running


def run(config: TableConfig) -> None:
    """Generate and score every unit not yet on disk."""
    out = Path(config.out)
    student = resolve_student(None)
    bundles = {"default": load_bundle(config.bundle, student=student, strict=True)}
    if Path(config.all_data_bundle, "manifest.json").is_file():
        bundles["all_data"] = load_bundle(config.all_data_bundle, student=student, strict=True)
    default = bundles["default"]
    chosen = choose_experts(config.bundle, out) if config.routes is None else _chosen(out)
    units = [u for u in all_units(SEEN_TASKS, UNSEEN_TASKS, list(default.experts), list(default.compositions), chosen)
             if u.bundle in bundles and (config.routes is None or u.label in config.routes)
             and (config.tasks is None or u.task in config.tasks)]
    restrict_units(out, config)
    run_units(units, bundles, config, student)


def run_units(units: Sequence[Unit], bundles: dict[str, Bundle], config: TableConfig, student: Path) -> None:
    """Generate and score the units not yet in ``<config.out>/units``; each unit's route reads ``bundles[unit.bundle]``."""
    out = Path(config.out)
    pending = [u for u in units if not unit_path(out, u).is_file()]
    print(f"[table] {len(units)} units, {len(units) - len(pending)} done, {len(pending)} to run", flush=True)
    if not pending:
        return
    planners = {k: RoutePlanner(b, student, out / "adapters" / k) for k, b in bundles.items()}
    plans = {}
    for unit in pending:
        items = test_items(unit.task, config)
        skipped = too_long(student, [i.prompt for i in items], config.max_model_len)
        kept = [i for i in range(len(items)) if i not in skipped]
        plan = planners[unit.bundle].plan(parse_route(unit.route), [items[i].prompt for i in kept],
                                          [unit.task] * len(kept))
        plans[unit] = (items, skipped, kept, plan)
    rank = {u: max((c.rank for c in p[3] if c is not None), default=0) for u, p in plans.items()}
    eval_config = EvalConfig(bundle=None, max_new_tokens=config.max_new_tokens, max_model_len=config.max_model_len,
                             dtype=config.dtype, max_num_seqs=config.max_num_seqs, max_loras=config.max_loras,
                             seed=config.seed)
    for group in ([u for u in pending if rank[u] > LOW_RANK], [u for u in pending if rank[u] <= LOW_RANK]):
        if group:
            _run_group(group, plans, eval_config, out, config, student, student_identity(student))


def test_items(task: str, config: TableConfig) -> list:
    """The task's test prompts of the table: `keep_examples` drawn (seeded) from the `max_examples` pool."""
    items = eval_items([task], None, config.max_examples, config.seed)
    return subsample(items, config.keep_examples, config.seed) if config.keep_examples else items


def restrict_units(out: Path, config: TableConfig) -> None:
    """Rewrite unit files holding more examples than the kept subset: keep those examples, re-score."""
    student = resolve_student(None)
    for path in sorted((out / "units").glob("*.json")):
        record = json.loads(path.read_text())
        items = test_items(record["task"], config)
        wanted = [i.index for i in items]
        if [e["index"] for e in record["examples"]] == wanted:
            continue
        by_index = {e["index"]: e for e in record["examples"]}
        if not set(wanted) <= set(by_index):
            raise ValueError(f"{path}: its examples do not include the kept subset; delete it to rerun the unit")
        examples = [by_index[i] for i in wanted]
        result = score([e["prediction"] for e in examples], [e["gold"] for e in examples], record["task"])
        n_too_long = len(too_long(student, [i.prompt for i in items], config.max_model_len))
        settings = {**record["settings"], "keep_examples": config.keep_examples,
                    "restricted_from": len(record["examples"])}
        write_json_atomic(path, {**record, **result, "too_long": n_too_long, "settings": settings, "examples": examples})
        print(f"[table] {path.name}: restricted to the {len(wanted)} kept examples", flush=True)


def _run_group(units: list[Unit], plans: dict, eval_config, out: Path, config: TableConfig, student_dir: Path,
               student: dict) -> None:
    adapters = {c.name: c for u in units for c in plans[u][3] if c is not None}
    max_rank = max((c.rank for c in adapters.values()), default=1)
    started = time.perf_counter()
    generator = VllmGenerator(student_dir, eval_config, max_rank, len(adapters))
    print(f"[table] engine up in {time.perf_counter() - started:.0f} s: {len(units)} units, "
          f"{len(adapters)} adapters, max rank {max_rank}", flush=True)
    chunks: list[list[Unit]] = [[]]
    for unit in units:
        if sum(len(plans[u][2]) for u in chunks[-1]) >= config.chunk_prompts:
            chunks.append([])
        chunks[-1].append(unit)
    try:
        for chunk in chunks:
            _run_chunk(chunk, plans, generator, out, config, student)
    finally:
        generator.close()  # the next group's engine needs the memory


def _run_chunk(chunk: list[Unit], plans: dict, generator, out: Path, config: TableConfig, student: dict) -> None:
    """Generate one chunk's prompts in one call; write each of its units."""
    prompts, choices = [], []
    for unit in chunk:
        items, _, kept, plan = plans[unit]
        prompts += [items[i].prompt for i in kept]
        choices += plan
    t0 = time.perf_counter()
    texts = generator(prompts, choices)
    seconds = time.perf_counter() - t0
    offset = 0
    for unit in chunk:
        items, skipped, kept, plan = plans[unit]
        mine = dict(zip(kept, texts[offset:offset + len(kept)]))
        offset += len(kept)
        predictions = [mine.get(i, "") for i in range(len(items))]
        choice_of = dict(zip(kept, plan))
        summary = summarise(items, predictions, skipped)["tasks"][unit.task]
        record = {
            "route": unit.route, "bundle": unit.bundle, "label": unit.label, "task": unit.task,
            "correct_flags": [int(is_correct(predictions[i], it.gold, get_task(unit.task).answer_kind))
                              for i, it in enumerate(items)],
            **summary, "student": student,
            "settings": {k: v for k, v in asdict(config).items() if k not in ("routes", "tasks", "out")},
            "examples": [{"index": it.index, "gold": it.gold, "prediction": predictions[i],
                          "adapter": choice_of[i].name if choice_of.get(i) else None,
                          "experts": dict(choice_of[i].experts) if choice_of.get(i) else {}}
                         for i, it in enumerate(items)],
        }
        write_json_atomic(unit_path(out, unit), record)
    print(f"[table] {', '.join(u.slug for u in chunk)}: {len(prompts)} prompts in {seconds:.0f} s "
          f"({len(prompts) / max(seconds, 1e-9):.2f} prompts/s)", flush=True)


# ----------------------------------------------------------------------------- the table


def assemble(out: Path) -> dict:
    """accuracy.json and table.md from the unit files: per route per task, the averages, the comparisons."""
    records = [json.loads(p.read_text()) for p in sorted((out / "units").glob("*.json"))]
    routes: dict[str, dict[str, dict]] = {}
    for r in records:
        routes.setdefault(r["label"], {})[r["task"]] = {k: r[k] for k in ("accuracy", "n", "correct", "too_long")}

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    def acc(label, task):
        return routes.get(label, {}).get(task, {}).get("accuracy")

    columns = {"base": {t: acc("base", t) for t in [*SEEN_TASKS, *UNSEEN_TASKS]},
               "oracle (own expert / exact composition)": {
                   **{t: acc(f"expert:{t}", t) for t in SEEN_TASKS},
                   **{t: acc(f"composition:{t}", t) for t in UNSEEN_TASKS}},
               "gate": {t: acc("gate", t) for t in [*SEEN_TASKS, *UNSEEN_TASKS]},
               "linear composition": {t: acc(f"composition:{t}-linear", t) for t in UNSEEN_TASKS},
               "single expert chosen by shots": {t: acc(f"expert:{e}", t) for t, e in _chosen(out).items()},
               "best single expert (on test)": {}, "all_data": {t: acc("all_data:expert:all_data", t)
                                                     for t in [*SEEN_TASKS, *UNSEEN_TASKS]}}
    best_expert = {}
    for t in UNSEEN_TASKS:
        scored = {r["route"].split(":", 1)[1]: r["accuracy"] for r in records
                  if r["task"] == t and r["bundle"] == "default" and r["route"].startswith("expert:")}
        if scored:
            name = max(scored, key=scored.get)
            best_expert[t] = {"expert": name, "accuracy": scored[name], "all": scored}
            columns["best single expert (on test)"][t] = scored[name]
    routing = _gate_routing(records, SEEN_TASKS)
    summary = {name: {"seen_average": mean([col.get(t) for t in SEEN_TASKS]) if any(t in col for t in SEEN_TASKS)
                      else None,
                      "unseen_average": mean([col.get(t) for t in UNSEEN_TASKS]), "tasks": col}
               for name, col in columns.items()}
    n = {t: next((r["n"] for r in records if r["task"] == t), None) for t in [*SEEN_TASKS, *UNSEEN_TASKS]}
    report = {"columns": summary, "routes": routes, "best_single_expert": best_expert, "gate_routing": routing,
              "examples_per_task": n, "units": len(records),
              "settings": records[0]["settings"] if records else None,
              "student": records[0]["student"] if records else None}
    write_json_atomic(out / "accuracy.json", report)
    write_text_atomic(out / "table.md", markdown(summary, n))
    return report


def _chosen(out: Path) -> dict[str, str]:
    path = out / "single_expert_choice.json"
    return {t: v["expert"] for t, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def _gate_routing(records: list[dict], seen: Sequence[str]) -> dict:
    """Share of seen-task test prompts whose gate mixture gives its largest weight to the task's own expert."""
    hits = total = 0
    per_task = {}
    for r in records:
        if r["label"] != "gate" or r["task"] not in seen:
            continue
        top = [max(e["experts"], key=e["experts"].get) if e["experts"] else None for e in r["examples"]]
        per_task[r["task"]] = sum(t == r["task"] for t in top) / len(top)
        hits += sum(t == r["task"] for t in top)
        total += len(top)
    return {"accuracy": hits / total if total else None, "prompts": total, "per_task": per_task}


def markdown(summary: dict, n: dict) -> str:
    """Tasks as rows, the comparison's columns, accuracy in percent; averages last."""
    def cell(value):
        return "–" if value is None else f"{100 * value:.1f}"

    names = list(summary)
    lines = ["| task | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for group, tasks in (("seen", SEEN_TASKS), ("unseen", UNSEEN_TASKS)):
        for t in tasks:
            lines.append(f"| {t} ({group}) | {n.get(t) or '–'} | "
                         + " | ".join(cell(summary[c]["tasks"].get(t)) for c in names) + " |")
    for key, title in (("seen_average", "seen average"), ("unseen_average", "unseen average")):
        lines.append(f"| **{title}** | | " + " | ".join(cell(summary[c][key]) for c in names) + " |")
    return "\n".join(lines) + "\n"


STAGES = ("run", "table", "all")


def stage_and_settings(cls: type[C], argv: list[str] | None, module: str, doc: str | None) -> tuple[str, C]:
    """A table command line: ``[run|table|all]`` (default all), then the settings class's flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = argv.pop(0) if argv and argv[0] in STAGES else "all"
    return stage, parse_settings(cls, argv, f"python -m {module} [run|table|all]", doc)


def main(argv: list[str] | None = None) -> int:
    """``[run|table|all]`` then TableConfig's flags (mode_cotd.settings, as every other command)."""
    stage, config = stage_and_settings(TableConfig, argv, "training.recipes.accuracy_table", __doc__)
    if stage in ("run", "all"):
        run(config)
    if stage in ("table", "all"):
        report = assemble(Path(config.out))
        print((Path(config.out) / "table.md").read_text(), end="")
        print(json.dumps({"gate_routing": report["gate_routing"]["accuracy"], "units": report["units"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
