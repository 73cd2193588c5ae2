"""Loaders, prompt variants, splits and JSONL I/O, on the real MoDE-CoTD files and on broken ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mode_cotd.data import (
    Example,
    load_examples,
    load_json_examples,
    load_jsonl_examples,
    load_task,
    question_of,
    read_jsonl,
    split_path,
    student_prompt,
    subsample,
    train_val_split,
    write_jsonl,
)
from mode_cotd.errors import ConfigError, DataError
from mode_cotd.tasks import TASKS

# From the data README.
TRAIN_SIZES = {"addsub": 210, "aqua": 2966, "coin_flip": 314, "commonsense_qa": 5444,
               "date_understanding": 170, "gsm8k": 3142, "last_letter_concatenation": 201,
               "multiarith": 323, "openbook_qa": 317, "single_eq": 287, "strategy_qa": 854, "svamp": 453,
               "tracking_shuffled_objects": 284}
TEST_SIZES = {"addsub": 119, "aqua": 254, "coin_flip": 150, "commonsense_qa": 1221,
              "date_understanding": 111, "gsm8k": 1319, "last_letter_concatenation": 150,
              "multiarith": 180, "openbook_qa": 500, "reclor": 500, "single_eq": 152, "strategy_qa": 687,
              "svamp": 300, "tracking_shuffled_objects": 225}


def _task_of(path: Path) -> str:
    return path.name.removesuffix("_train.json").removesuffix("_test.json").removesuffix(".jsonl")


@pytest.fixture(scope="module")
def all_files(data_dir) -> dict[Path, list[Example]]:
    """Every data file in the folder, loaded."""
    paths = sorted(p for p in data_dir.rglob("*") if p.suffix in (".json", ".jsonl"))
    return {p: load_examples(p, _task_of(p)) for p in paths}


# --- the real files ------------------------------------------------------------------


def test_every_file_loads(data_dir, all_files):
    assert len(all_files) == 13 + 13 + 14
    sizes = {(p.parent.name, _task_of(p)): len(exs) for p, exs in all_files.items()}
    assert {t: sizes[("train", t)] for t in TRAIN_SIZES} == TRAIN_SIZES
    assert {t: sizes[("evaluation", t)] for t in TEST_SIZES} == TEST_SIZES
    assert all(sizes[("learn", t)] == 5 for t in TASKS if t != "coin_flip")
    for path, examples in all_files.items():
        assert _task_of(path) in TASKS
        assert all(e.task == _task_of(path) and e.source == str(path) for e in examples)
        if path.parent.name == "evaluation":  # gold labels only
            assert all(e.rationale is None and e.answer is None and e.gold == e.output for e in examples)
        else:  # rationale --> answer END
            assert all(e.rationale and e.answer and e.gold == e.answer for e in examples), path


def test_load_task_maps_splits(data_dir):
    learn = load_task("gsm8k", "learn", data_dir)
    assert len(learn) == 5 and learn[0].answer == "66"
    assert len(load_task("gsm8k", "test", data_dir)) == 1319
    assert split_path("gsm8k", "train", data_dir) == data_dir / "train" / "gsm8k_train.json"
    assert split_path("gsm8k", "learn", data_dir) == data_dir / "learn" / "gsm8k.jsonl"
    assert split_path("gsm8k", "test", data_dir) == data_dir / "evaluation" / "gsm8k_test.json"


def test_missing_splits_name_the_path(data_dir):
    with pytest.raises(DataError) as err:
        load_task("reclor", "train", data_dir)  # the data has no reclor train file
    assert str(data_dir / "train" / "reclor_train.json") in str(err.value) and "train split" in str(err.value)
    with pytest.raises(DataError, match="coin_flip.jsonl"):
        load_task("coin_flip", "learn", data_dir)
    with pytest.raises(ConfigError, match="valid splits"):
        load_task("gsm8k", "dev", data_dir)
    with pytest.raises(ConfigError, match="unknown task"):
        load_task("gsm9k", "test", data_dir)


def test_data_dir_defaults_to_paths(monkeypatch, tmp_path):
    (tmp_path / "learn").mkdir()
    (tmp_path / "learn" / "svamp.jsonl").write_text('{"input": "q", "output": "r\\n\\n-->\\n\\n2.0 END"}\n')
    monkeypatch.setenv("MODE_COTD_DATA", str(tmp_path))
    assert load_task("svamp", "learn")[0].answer == "2.0"


# --- prompt variants -----------------------------------------------------------------


def test_question_of_every_variant(all_files):
    """Every input reduces to a bare question, and the test inputs are rebuilt exactly."""
    for path, examples in all_files.items():
        for e in examples:
            q = question_of(e)
            assert q and q == q.strip(), path
            assert not q.startswith(("Infer ", "Q:")) and not q.endswith(("\nA:", "###", "\\n")), path
            prompt = student_prompt(e)
            assert prompt.endswith("\nA:") and prompt.startswith(TASKS[e.task].instruction)
            if path.parent.name == "evaluation" and e.task != "openbook_qa":
                assert prompt == e.input, path  # openbook_qa's test inputs are the bare question


def test_question_of_real_examples(data_dir):
    # raw Fine-tune-CoT prompt ("###")
    strategy = load_task("strategy_qa", "learn", data_dir)[0]
    assert strategy.input.endswith("\n\n###\n\n")
    assert question_of(strategy) == "Were weather phenomena avoided when naming minor league baseball teams?"
    assert student_prompt(strategy) == (
        "Infer True(yes) or False(no) for the question.\n\n"
        "Were weather phenomena avoided when naming minor league baseball teams?\nA:"
    )
    # openbook_qa: "<instruction> Q: ...\nA: Let's think step by step." and a bare test question
    book = load_task("openbook_qa", "train", data_dir)[0]
    assert question_of(book) == ("Meadow voles consume Answer choices: (A) producers, (B) apex predators, "
                                 "(C) decomposers, (D) detritivores.")
    book_test = load_task("openbook_qa", "test", data_dir)[0]
    assert question_of(book_test) == book_test.input
    # reclor's learn inputs carry a literal "\n" before "\nA:"
    reclor = load_task("reclor", "learn", data_dir)[0]
    assert reclor.input.endswith("\\n\nA:") and question_of(reclor).endswith("state of affairs.")
    # the usual variant, from a string
    assert question_of("Infer the correct answer for the question.\n\nQ: 2 + 2?\nA:") == "2 + 2?"


# --- splits --------------------------------------------------------------------------


def test_train_val_split_is_seeded(data_dir):
    examples = load_task("svamp", "train", data_dir)
    train, val = train_val_split(examples, 0.1, seed=0)
    assert len(val) == round(len(examples) * 0.1) and len(train) + len(val) == len(examples)
    assert {id(e) for e in train}.isdisjoint(id(e) for e in val)
    assert {id(e) for e in train} | {id(e) for e in val} == {id(e) for e in examples}
    assert train_val_split(examples, 0.1, seed=0) == (train, val)
    assert train_val_split(examples, 0.1, seed=1)[1] != val
    assert [examples.index(e) for e in val] == sorted(examples.index(e) for e in val)  # input order kept


def test_train_val_split_edges():
    assert train_val_split([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])
    train, val = train_val_split([1, 2, 3], 0.01, seed=0)
    assert len(val) == 1 and len(train) == 2  # at least one validation example
    assert train_val_split([1], 0.5, seed=0) == ([1], [])
    with pytest.raises(ConfigError, match="val_fraction"):
        train_val_split([1, 2], 1.0, seed=0)


def test_subsample(data_dir):
    examples = load_task("addsub", "train", data_dir)
    five = subsample(examples, 5, seed=3)
    assert len(five) == 5 and five == subsample(examples, 5, seed=3)
    assert five != subsample(examples, 5, seed=4)
    assert len({id(e) for e in five}) == 5
    assert subsample(examples, 10_000, seed=0) == examples
    with pytest.raises(ConfigError):
        subsample(examples, -1, seed=0)


# --- writing -------------------------------------------------------------------------


def test_write_then_read_jsonl_keeps_provenance(data_dir, tmp_path):
    real = load_task("gsm8k", "learn", data_dir)[0]
    taught = Example(task="gsm8k", input=real.input, output=real.output, source="teacher:http://x/v1",
                     model="some-llm", prompt="Q: ...\nA: Let's think step by step.", sample_index=2)
    odd = Example(task="last_letter_concatenation", input="q\u2028with a line separator",
                  output="r\n\n-->\n\nab END")
    path = tmp_path / "out" / "rationales.jsonl"
    assert write_jsonl(path, [taught, odd]) == 2
    assert os.listdir(path.parent) == ["rationales.jsonl"]  # no temp file left behind
    back = load_jsonl_examples(path, None)  # tasks come from the records
    assert back[0] == taught
    assert back[0].answer == real.answer and back[0].sample_index == 2
    assert back[1].input == odd.input and back[1].task == "last_letter_concatenation"
    assert read_jsonl(path)[0]["model"] == "some-llm"
    with pytest.raises(DataError, match="record is for task 'last_letter_concatenation', expected 'gsm8k'"):
        load_jsonl_examples(path, "gsm8k")


def test_read_jsonl_empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert read_jsonl(path, allow_empty=True) == []
    with pytest.raises(DataError, match="empty"):
        read_jsonl(path)


# --- malformed files ------------------------------------------------------------------

GOOD = {"input": "q", "output": "r\n\n-->\n\n1 END"}


def _write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(("content", "message"), [
    ('[{"input": "q", "output": "a"},\n {"input": "q" "output": "a"}]', r"invalid JSON at line 2"),
    ('{"input": "q", "output": "a"}', r"expected a JSON list"),
    ("", r"file is empty"),
    ("  \n", r"file is empty"),
    ("[]", r"list is empty"),
    (json.dumps([GOOD, GOOD, {"input": "q"}]), r"record 3 \(index 2\): missing field 'output'"),
    (json.dumps([GOOD, {"input": 7, "output": "a"}]),
     r"record 2 \(index 1\): field 'input' must be a string, got int"),
    (json.dumps([GOOD, ["q", "a"]]), r"record 2 \(index 1\): expected an object"),
    (json.dumps([{**GOOD, "sample_index": "one"}]), r"record 1 \(index 0\): field 'sample_index'"),
])
def test_malformed_json_names_file_and_record(tmp_path, content, message):
    path = _write(tmp_path, "bad_train.json", content)
    with pytest.raises(DataError, match=message) as err:
        load_json_examples(path, "gsm8k")
    assert str(path) in str(err.value)


@pytest.mark.parametrize(("content", "message"), [
    (json.dumps(GOOD) + "\n{oops\n", r"line 2, record 2 \(index 1\): invalid JSON"),
    (json.dumps(GOOD) + "\n\n" + json.dumps({"output": "a"}) + "\n",
     r"line 3, record 2 \(index 1\): missing field 'input'"),
    (json.dumps(GOOD) + "\n[1, 2]\n", r"line 2, record 2 \(index 1\): expected an object"),
    (json.dumps({"input": "q", "output": None}) + "\n",
     r"line 1, record 1 \(index 0\): field 'output' must be a string"),
    ("\n\n", r"file is empty"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, content, message):
    path = _write(tmp_path, "bad.jsonl", content)
    with pytest.raises(DataError, match=message) as err:
        load_jsonl_examples(path, "gsm8k")
    assert str(path) in str(err.value)


def test_read_jsonl_names_line(tmp_path):
    path = _write(tmp_path, "bad.jsonl", '{"a": 1}\n"just a string"\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2, record 2 \(index 1\): expected a JSON object"):
        read_jsonl(path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"nope.json: file not found; expected a JSON list"):
        load_json_examples(tmp_path / "nope.json", "gsm8k")
    with pytest.raises(DataError, match=r"nope.jsonl: file not found; expected a JSON-lines file"):
        load_jsonl_examples(tmp_path / "nope.jsonl", "gsm8k")
    with pytest.raises(DataError, match="not a file"):
        load_json_examples(tmp_path, "gsm8k")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe[]")
    with pytest.raises(DataError, match=r"binary.json: not UTF-8"):
        load_json_examples(binary, "gsm8k")
    with pytest.raises(DataError, match="no 'task' field"):
        load_jsonl_examples(_write(tmp_path, "x.jsonl", json.dumps(GOOD)), None)

