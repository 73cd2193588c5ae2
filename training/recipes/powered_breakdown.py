"""Where a gate column's difference to all_data comes from: its prompts split by what the gate chose.

    python -m training.recipes.powered_breakdown [--out benchmarks/results/powered] [--column "shared+gate residual"]

The residual bundle's gate sends a prompt either to all_data alone ("shared only": its top probability fell
below the calibrated threshold) or to all_data + its top-2 mixture of residual experts. On the shared-only
prompts the route *is* all_data, so the two columns can only differ where the gate mixed in experts. Per task
this reads both columns' unit files (same seeded prompts, paired by index) and counts, per part:

    n          prompts in the part
    route      correct answers of the column on them
    all_data   correct answers of all_data on the same prompts
    gained     prompts the column got right and all_data wrong
    lost       prompts all_data got right and the column wrong

and writes ``<out>/breakdown.json`` and ``breakdown.md``. Nothing is run: the unit files are the whole input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mode_cotd.atomic import write_json_atomic, write_text_atomic
from mode_cotd.tasks import SEEN_TASKS, UNSEEN_TASKS
from training.recipes.accuracy_table import Unit, unit_path

REFERENCE = "all_data"
"""The column every part is compared with (the shared adapter alone)."""
PARTS = ("shared only", "mixed")
"""The gate's choice for a prompt: all_data alone, or all_data with routed experts."""


def unit_file(out: Path, column: str, task: str) -> Path:
    """The unit file of one column on one task (the accuracy table's naming)."""
    return unit_path(out, Unit(route="", task=task, column=column))


def empty_parts() -> dict[str, dict[str, int]]:
    """Zero counts for every part."""
    return {p: {"n": 0, "route": 0, REFERENCE: 0, "gained": 0, "lost": 0} for p in PARTS}


def part_of(example: dict, shared: str) -> str:
    """"shared only" when the adapter that served the prompt holds nothing but the shared adapter."""
    return "shared only" if set(example["experts"]) <= {shared} else "mixed"


def breakdown_task(route_unit: dict, reference_unit: dict, shared: str = REFERENCE) -> dict[str, dict[str, int]]:
    """Per part: n, route, all_data, gained, lost (see the module docstring), paired by example index."""
    reference = {e["index"]: flag for e, flag in zip(reference_unit["examples"], reference_unit["correct_flags"],
                                                     strict=True)}
    parts = empty_parts()
    for example, flag in zip(route_unit["examples"], route_unit["correct_flags"], strict=True):
        if example["index"] not in reference:
            raise SystemExit(f"{route_unit['task']}: example {example['index']} of {route_unit['label']!r} has no "
                             f"{REFERENCE} counterpart: the two columns were not run on the same prompts")
        mine, theirs = int(flag), int(reference[example["index"]])
        counts = parts[part_of(example, shared)]
        counts["n"] += 1
        counts["route"] += mine
        counts[REFERENCE] += theirs
        counts["gained"] += int(mine > theirs)
        counts["lost"] += int(theirs > mine)
    return parts


def breakdown(out: Path, column: str) -> dict:
    """{task: parts} for every task both columns have, plus the totals per group (seen, unseen)."""
    report: dict = {"column": column, "reference": REFERENCE, "tasks": {}, "groups": {}}
    for group, tasks in (("seen", SEEN_TASKS), ("unseen", UNSEEN_TASKS)):
        totals = empty_parts()
        for task in tasks:
            paths = unit_file(out, column, task), unit_file(out, REFERENCE, task)
            if not all(p.is_file() for p in paths):
                continue
            parts = breakdown_task(*(json.loads(p.read_text()) for p in paths))
            report["tasks"][task] = parts
            for p in PARTS:
                for key, value in parts[p].items():
                    totals[p][key] += value
        report["groups"][group] = totals
    return report


def markdown(report: dict) -> str:
    """One row per task and part, then the group totals."""
    lines = [f"| task | gate's choice | n | {report['column']} correct | {REFERENCE} correct | gained | lost |",
             "|---|---|---|---|---|---|---|"]
    rows = [*report["tasks"].items(), *((f"**{g} total**", parts) for g, parts in report["groups"].items())]
    for task, parts in rows:
        for p in PARTS:
            c = parts[p]
            lines.append(f"| {task} | {p} | {c['n']} | {c['route']} | {c[REFERENCE]} | {c['gained']} | {c['lost']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/powered"))
    parser.add_argument("--column", default="shared+gate residual")
    args = parser.parse_args(argv)
    report = breakdown(args.out, args.column)
    if not report["tasks"]:
        raise SystemExit(f"no task has unit files of both {args.column!r} and {REFERENCE!r} in {args.out}/units")
    write_json_atomic(args.out / "breakdown.json", report)
    text = markdown(report)
    write_text_atomic(args.out / "breakdown.md", text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
