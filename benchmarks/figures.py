"""The measured figures that README.md and docs/performance.md quote, rendered from one results file each.

A document quotes a figure block between two markers::

    <!-- figures:full-bench -->
    ...generated markdown...
    <!-- /figures:full-bench -->

`render(name)` makes a block's text from its source (`BLOCKS`: the results file of the latest committed
run); `python -m benchmarks.figures` rewrites every block in DOCUMENTS, and `--check` only reports the
blocks that differ (tests/benchmarks/test_figures.py runs the check, so a quoted figure cannot drift
from its results file). A new run is quoted by pointing its block at the new results file and
running the command once.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from mode_cotd.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "docs/performance.md")
"""The files (repository-relative) whose figure blocks are generated."""
LATEST_FULL = "benchmarks/results/full-20261208b"
"""The latest committed full `mode-cotd bench` run: the one README and docs/performance.md quote."""

ROWS = (
    ("expert_vs_vllm_lora", "d / b: one expert, mode-cotd / `vllm serve` with vLLM's LoRA ops"),
    ("student_vs_vllm_base", "c / a: student route, mode-cotd / `vllm serve`"),
    ("gate_vs_expert", "e / d: gate mixtures / one expert"),
    ("gate_vs_student", "e / c: gate mixtures / student route"),
    ("gate_vs_peft", "e / g: gate mixtures / transformers + peft"),
    ("composite_hit_rate", "requests served with no composite to build (zipf:1.1)"),
    ("composite_build_p50_ms", "new-composite build p50 (ms; 0: none built)"),
    ("new_vs_cached_ttft", "a never-seen mixture's TTFT / the same mixture cached"),
    ("mixtures_spread", "scaling rows, fastest / slowest"),
)
"""(key of results.json's `targets`, what it compares), in the order of the table."""


def _number(value: float, target: float | None = None) -> str:
    """Three decimals, four where three would round the value onto its target (0.7951 is not "0.795 ≥ 0.795")."""
    if target is not None and value != target and round(value, 3) == round(target, 3):
        return f"{value:.4f}"
    return f"{value:.3f}"


def _status(entry: dict) -> str:
    if entry.get("target") is None:
        return "–"
    bound = "≤" if entry.get("target_is") == "upper bound" else "≥"
    return f"{bound} {entry['target']:g}: {'**met**' if entry['met'] else 'missed'}"


def full_bench(results: dict, source: str) -> str:
    """The full bench's ratio table and scaling rows, from its results.json."""
    targets = results["targets"]
    command = results.get("command", "mode-cotd bench")
    head = (f"From `{source}/results.json` (`{command}`; concurrency "
            f"{results.get('ratio_concurrency', '?')}, float32, this 2-core CPU):")
    lines = [head, "", "| ratio | measured | target |", "| --- | --- | --- |"]
    for key, title in ROWS:
        if key in targets:
            lines.append(f"| {title} | {_number(targets[key]['value'], targets[key].get('target'))} | {_status(targets[key])} |")
    scaling = targets.get("mixtures_vs_student")
    if scaling:
        rows = ", ".join(f"{m} in flight {_number(v, scaling['target'])}" for m, v in scaling["value"].items())
        verdict = "met" if scaling["met"] else "missed"
        tail = f"(target ≥ {scaling['target']:g}: {verdict})."
        lines += ["", f"Scaling rows, output tok/s / the same load on the student route: {rows} {tail}"]
    return "\n".join(lines)


BLOCKS: dict[str, tuple[str, Callable[[dict, str], str]]] = {
    "full-bench": (LATEST_FULL, full_bench),
}
"""Block name -> (results folder, renderer)."""


def render(name: str) -> str:
    source, renderer = BLOCKS[name]
    return renderer(json.loads((ROOT / source / "results.json").read_text()), source)


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- figures:{re.escape(name)} -->)(.*?)(<!-- /figures:{re.escape(name)} -->)", re.DOTALL)


def stale_blocks(text: str) -> list[str]:
    """Names of the blocks in ``text`` whose content differs from what their results render."""
    return [name for name in BLOCKS for m in _pattern(name).finditer(text) if m.group(2) != f"\n{render(name)}\n"]


def rewrite(text: str) -> str:
    """``text`` with every block re-rendered."""
    for name in BLOCKS:
        text = _pattern(name).sub(lambda m, name=name: f"{m.group(1)}\n{render(name)}\n{m.group(3)}", text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report stale blocks, change nothing (exit 1 if any)")
    args = parser.parse_args(argv)
    stale = []
    for doc in DOCUMENTS:
        path = ROOT / doc
        text = path.read_text(encoding="utf-8")
        names = stale_blocks(text)
        stale += [f"{doc}: {n}" for n in names]
        if names and not args.check:
            write_text_atomic(path, rewrite(text))
    for line in stale:
        print(("stale: " if args.check else "rewrote: ") + line)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
