"""Benchmark prompts: the canonical student prompts of the shared test sets, tasks interleaved.

Every scenario of one run gets the same list, so each serves the same prompts in the same order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mode_cotd.data import load_task, student_prompt, subsample
from mode_cotd.errors import ConfigError
from mode_cotd.tasks import SEEN_TASKS


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt."""

    task: str
    """The test set it comes from."""
    text: str
    """The prompt as the student sees it (`<instruction>\\n\\nQ: <question>\\nA:`)."""


def interleave(per_task: dict[str, Sequence[str]], n: int) -> list[Prompt]:
    """n prompts taking one from each task in turn (round robin, in the tasks' order), cycling when short."""
    if n <= 0:
        return []
    tasks = [t for t, texts in per_task.items() if texts]
    if not tasks:
        raise ConfigError("no prompts to draw from")
    out: list[Prompt] = []
    round_ = 0
    while len(out) < n:
        for task in tasks:
            texts = per_task[task]
            out.append(Prompt(task, texts[round_ % len(texts)]))
            if len(out) == n:
                break
        round_ += 1
    return out


def load_prompts(n: int, tasks: Sequence[str] = SEEN_TASKS, seed: int = 0,
                 data_dir: str | Path | None = None) -> list[Prompt]:
    """n test-set prompts over `tasks` (seeded subsample of each test file, interleaved)."""
    per_task_count = -(-n // max(len(tasks), 1))
    per_task = {task: [student_prompt(e) for e in subsample(load_task(task, "test", data_dir), per_task_count, seed)]
                for task in tasks}
    return interleave(per_task, n)


def write_jsonl(prompts: Sequence[Prompt], path: Path) -> Path:
    """The prompts as `{"prompt": ...}` lines: the custom dataset format of `vllm bench serve`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in prompts), encoding="utf-8")
    return path
