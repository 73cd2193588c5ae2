"""lm-eval tasks over the paper's test files (``evaluation/<task>_test.json`` of the shared data).

Two task families, one YAML file per MoDE-CoTD task, each family also a tag:

    mode_cotd_gen_<task>   generate_until: the canonical prompt (mode_cotd.data.student_prompt), greedy, 256
                           new tokens, until " END"; scored by the paper's answer rule (mode_cotd.tasks.is_correct:
                           the text after the last "-->", else the last number / option letter / yes-no)
    mode_cotd_mc_<task>    multiple_choice (loglikelihood): the same prompt, then each answer option's text
                           (" bank", " library", ...; " yes" / " no" for the yes/no tasks); acc = the most likely
                           option is the gold one. Only tasks whose test prompts list options, and the yes/no tasks.

lm-eval imports this file by path (`custom_dataset: !function utils.load_test`); the data folder is
mode_cotd.paths.data_dir() ($MODE_COTD_DATA). Nothing here is tuned on the test files: they are only read.
"""

from __future__ import annotations

import re
from typing import Any

from mode_cotd.data import load_task, question_of, student_prompt
from mode_cotd.errors import DataError
from mode_cotd.tasks import TASKS, get_task, is_correct, normalize_gold

MC_TASKS = ("aqua", "commonsense_qa", "date_understanding", "tracking_shuffled_objects", "openbook_qa", "reclor",
            "coin_flip", "strategy_qa")
"""Tasks with answer options: option tasks whose test prompts list "(A) ... (B) ...", and the yes/no tasks."""
YES_NO = ("yes", "no")
"""The options of the yes/no tasks, in that order (normalize_gold maps True/False and Yes/No to them)."""

_CHOICES_CUE = re.compile(r"answer choices:", re.IGNORECASE)
_OPTION = re.compile(r"\(([A-F])\)\s*")


def answer_options(question: str) -> list[str]:
    """The options' texts listed after the last "Answer choices:" of a question, in letter order (A, B, ...):
    "... Answer choices: (A) bank, (B) library." -> ["bank", "library"]. DataError when there are none."""
    cues = list(_CHOICES_CUE.finditer(question))
    if not cues:
        raise DataError(f"no 'Answer choices:' in {question[:80]!r}")
    parts = _OPTION.split(question[cues[-1].end():])  # ["", "A", "bank, ", "B", "library."]
    letters, texts = parts[1::2], [t.strip().rstrip(",").rstrip(".").strip() for t in parts[2::2]]
    if letters != [chr(ord("A") + i) for i in range(len(letters))] or len(letters) < 2 or not all(texts):
        raise DataError(f"options not (A), (B), ... in order: {question[cues[-1].end():][:120]!r}")
    return texts


def gen_doc(example: Any) -> dict[str, Any]:
    kind = get_task(example.task).answer_kind
    return {"prompt": student_prompt(example), "gold": example.gold, "kind": kind}


def mc_doc(example: Any) -> dict[str, Any]:
    kind = get_task(example.task).answer_kind
    doc = gen_doc(example)
    if kind == "yes_no":
        doc["choices"] = list(YES_NO)
        doc["label"] = YES_NO.index(normalize_gold(example.gold, kind))
    elif kind == "option":
        doc["choices"] = answer_options(question_of(example))
        doc["label"] = ord(normalize_gold(example.gold, kind)) - ord("A")
        if doc["label"] >= len(doc["choices"]):
            raise DataError(f"{example.task}: gold {example.gold!r} is not among {len(doc['choices'])} options")
    else:
        raise DataError(f"{example.task}: {kind} answers have no options")
    return doc


def load_test(task: str, family: str = "gen", **_: Any):
    """lm-eval's dataset for one task: {"test": Dataset} of the docs of its test file (family "gen" or "mc")."""
    import datasets

    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    build = {"gen": gen_doc, "mc": mc_doc}[family]
    docs = [build(example) for example in load_task(task, "test")]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def process_generation(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """The paper's answer rule on one generation (mode_cotd.tasks.is_correct)."""
    return {"acc": float(is_correct(results[0], doc["gold"], doc["kind"]))}
