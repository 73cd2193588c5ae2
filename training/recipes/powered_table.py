"""The powered accuracy table (issue 27): every route against all_data and the base student, with paired intervals.

    python -m training.recipes.powered_table run     # resumable, unit by unit; progress on stdout
    python -m training.recipes.powered_table table   # accuracy.json + table.md from the unit files alone

The 50-prompt table (training/recipes/accuracy_table.py) could not tell most routes apart (one example =
2 points). Here every task is evaluated on `max_examples` seeded test prompts (150: a task's whole test
file where it is smaller: addsub 119, date_understanding 111), and each route is compared with all_data
and with the base student on the same prompts by a paired, task-stratified bootstrap of the macro
average (training/paired_bootstrap.py). Units, engines, chunking and scoring are the accuracy table's
(`run_units`): one unit = one column on one task, written atomically to ``<out>/units/`` with each
example's prediction, adapter and correctness, and skipped when the run starts again.

Columns (`COLUMNS`: bundle, route, tasks), in the order they run:

    all_data              the shared multi-task LoRA (bundles/all_data), every task
    base                  the frozen student, every task
    gate                  the default bundle's gate: top-2 mixtures of the ten task experts, every task
    shared+own residual   student + all_data + the task's own residual expert (bundles/residual), seen tasks
    shared+gate residual  student + all_data + the gate's top-2 mixture of residual experts, every task
    seen comp., <bundle> <mode>
                          the seen task's few-shot composition of all the bundle's experts
                          (training/recipes/seen_compositions.py): residual (on top of all_data) or default
                          experts, exact or linear mixing; seen tasks

A column whose bundle is missing, or a unit whose composition is not recorded yet, is left for a later run
(the residual experts are trained by training/recipes/residual_experts.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mode_cotd.atomic import write_json_atomic, write_text_atomic
from mode_cotd.bundle import load_bundle
from mode_cotd.student import resolve_student
from mode_cotd.tasks import SEEN_TASKS, UNSEEN_TASKS
from training.paired_bootstrap import paired_interval
from training.recipes.accuracy_table import TableConfig, Unit, run_units, stage_and_settings

ALL = (*SEEN_TASKS, *UNSEEN_TASKS)
COLUMNS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "all_data": ("all_data", "expert:all_data", ALL),
    "base": ("default", "base", ALL),
    "gate": ("default", "gate", ALL),
    "shared+own residual": ("residual", 'mixture:{{"all_data": 1.0, "{task}": 1.0}}', SEEN_TASKS),
    "shared+gate residual": ("residual", "gate", ALL),
    **{f"seen comp., {key} {mode}": (key, f"composition:{{task}}-seen-{mode}", SEEN_TASKS)
       for key in ("residual", "default") for mode in ("exact", "linear")},
}
"""Column -> (bundle key, route with {task} filled per unit, the tasks it is evaluated on)."""
REFERENCES = ("all_data", "base")
"""Every column is compared with these, on the tasks both have."""


@dataclass
class PoweredConfig(TableConfig):
    """Settings of the powered table run (the accuracy table's, with its own defaults)."""

    out: str = "benchmarks/results/powered"
    """Unit files, accuracy.json and table.md."""
    max_examples: int = 150
    """Test examples per task (seeded subsample; the whole test file where it is smaller)."""
    keep_examples: int | None = None
    """Run every example of the pool."""
    residual_bundle: str = "bundles/residual"
    """Bundle of the residual experts, all_data among them as the shared adapter; missing: its columns wait."""
    columns: list[str] | None = None
    """Only these columns (names of COLUMNS); None: all."""
    resamples: int = 10_000
    """Bootstrap resamples of each interval."""


def units(config: PoweredConfig, available: set[str]) -> list[Unit]:
    """The units of the columns whose bundles are available, column by column."""
    chosen = config.columns or list(COLUMNS)
    unknown = sorted(set(chosen) - set(COLUMNS))
    if unknown:
        raise SystemExit(f"unknown columns {unknown}; columns: {list(COLUMNS)}")
    return [Unit(route.format(task=task), task, bundle=bundle, column=name)
            for name in chosen for bundle, route, tasks in [COLUMNS[name]] if bundle in available
            for task in tasks if config.tasks is None or task in config.tasks]


def run(config: PoweredConfig) -> None:
    student = resolve_student(None)
    paths = {"default": config.bundle, "all_data": config.all_data_bundle, "residual": config.residual_bundle}
    bundles = {key: load_bundle(path, student=student, strict=True) for key, path in paths.items()
               if Path(path, "manifest.json").is_file()}
    if "residual" in bundles and len(bundles["residual"].experts) < len(SEEN_TASKS) + 1:
        del bundles["residual"]  # still being trained
    ready = [u for u in units(config, set(bundles)) if not u.route.startswith("composition:")
             or u.route.removeprefix("composition:") in bundles[u.bundle].compositions]
    run_units(ready, bundles, config, student)


def assemble(config: PoweredConfig) -> dict:
    """Per column: per-task accuracy, seen and unseen averages, and paired intervals against REFERENCES."""
    out = Path(config.out)
    records = [json.loads(p.read_text()) for p in sorted((out / "units").glob("*.json"))]
    flags = {(r["label"], r["task"]): r["correct_flags"] for r in records}
    report: dict = {"columns": {}, "examples_per_task": {r["task"]: r["n"] for r in records},
                    "settings": asdict(config), "units": len(records)}
    for name in COLUMNS:
        tasks = {t: flags[(name, t)] for t in ALL if (name, t) in flags}
        if not tasks:
            continue
        column: dict = {"tasks": {t: 100 * sum(f) / len(f) for t, f in tasks.items()}}
        for group, members in (("seen", SEEN_TASKS), ("unseen", UNSEEN_TASKS)):
            done = [t for t in members if t in tasks]
            column[f"{group}_average"] = (sum(column["tasks"][t] for t in done) / len(done)
                                          if len(done) == len(members) else None)
            for ref in REFERENCES:
                shared = [t for t in done if (ref, t) in flags]
                if ref == name or len(shared) < len(members):
                    continue
                diff = paired_interval({t: tasks[t] for t in shared}, {t: flags[(ref, t)] for t in shared},
                                       config.resamples, config.seed)
                column[f"{group}_vs_{ref}"] = asdict(diff)
        report["columns"][name] = column
    write_json_atomic(out / "accuracy.json", report)
    write_text_atomic(out / "table.md", markdown(report))
    return report


def markdown(report: dict) -> str:
    """Tasks as rows, columns as columns (accuracy in %), then the averages and the paired differences."""
    columns = report["columns"]
    names = list(columns)
    n = report["examples_per_task"]

    def cell(value):
        return "–" if value is None else f"{value:.1f}"

    lines = ["| task | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for group, tasks in (("seen", SEEN_TASKS), ("unseen", UNSEEN_TASKS)):
        lines += [f"| {t} ({group}) | {n.get(t, '–')} | " + " | ".join(cell(columns[c]["tasks"].get(t)) for c in names)
                  + " |" for t in tasks]
    for group in ("seen", "unseen"):
        lines.append(f"| **{group} average** | | " + " | ".join(cell(columns[c].get(f"{group}_average"))
                                                              for c in names) + " |")
        for ref in REFERENCES:
            cells = []
            for c in names:
                d = columns[c].get(f"{group}_vs_{ref}")
                cells.append("–" if d is None else f"{d['diff']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]")
            lines.append(f"| {group}: Δ vs {ref} (95% CI) | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``[run|table|all]`` then PoweredConfig's flags."""
    stage, config = stage_and_settings(PoweredConfig, argv, "training.recipes.powered_table", __doc__)
    if stage in ("run", "all"):
        run(config)
    if stage in ("table", "all"):
        assemble(config)
        print((Path(config.out) / "table.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
