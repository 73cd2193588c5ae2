"""The lm-eval task folder (benchmarks/lm_eval_tasks): one task per test file, options parsed, the paper's rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.lm_eval_tasks.utils import MC_TASKS, answer_options, load_test, process_generation
from mode_cotd.errors import DataError
from mode_cotd.tasks import TASKS

FOLDER = Path(__file__).resolve().parents[2] / "benchmarks" / "lm_eval_tasks"


def test_one_yaml_per_task_and_family():
    names = {p.stem for p in FOLDER.glob("mode_cotd_*.yaml")}
    assert names == {f"mode_cotd_gen_{t}" for t in TASKS} | {f"mode_cotd_mc_{t}" for t in MC_TASKS}
    for name in names:
        family, task = name.removeprefix("mode_cotd_").split("_", 1)
        text = (FOLDER / f"{name}.yaml").read_text()
        assert f"task: {name}\n" in text and f"  task: {task}\n" in text and f"  family: {family}\n" in text


def test_answer_options():
    assert answer_options("Q? Answer choices: (A) bank, (B) new york.") == ["bank", "new york"]
    assert answer_options("x Answer Choices: (A) one thing (B) other, thing (C) 0.5") == ["one thing", "other, thing",
                                                                                       "0.5"]
    for bad in ("no options here", "Answer choices: (A) a, (C) c", "Answer choices: (A) a"):
        with pytest.raises(DataError):
            answer_options(bad)


def test_generation_is_scored_by_the_papers_rule():
    doc = {"gold": "43", "kind": "number"}
    assert process_generation(doc, ["She gave 70 - 27 = 43.\n\n-->\n\n43"]) == {"acc": 1.0}
    assert process_generation(doc, ["70 - 27 = 43\n\n-->\n\n430"]) == {"acc": 0.0}
    assert process_generation({"gold": "B", "kind": "option"}, ["so (B).\n\n-->\n\nB"]) == {"acc": 1.0}


def test_every_test_file_loads(data_dir):
    for task in TASKS:
        docs = load_test(task, "gen")["test"]
        assert len(docs) > 0 and docs[0]["prompt"].endswith("\nA:") and docs[0]["gold"]
    for task in MC_TASKS:
        docs = load_test(task, "mc")["test"]
        assert all(0 <= d["label"] < len(d["choices"]) for d in docs), task


def test_lm_eval_reads_the_folder(data_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(FOLDER))
    tasks = get_task_dict(["mode_cotd_gen_addsub", "mode_cotd_mc_commonsense_qa"], manager)
    gen, mc = tasks["mode_cotd_gen_addsub"], tasks["mode_cotd_mc_commonsense_qa"]
    doc = next(iter(gen.test_docs()))
    assert gen.config.output_type == "generate_until" and gen.doc_to_text(doc).startswith("Infer the correct answer")
    doc = next(iter(mc.test_docs()))
    assert mc.config.output_type == "multiple_choice"
    assert mc.doc_to_choice(doc) == ["bank", "library", "department store", "mall", "new york"]
    assert mc.doc_to_target(doc) == 0
