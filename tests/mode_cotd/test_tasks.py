"""Task registry, formats and scoring, checked on the real MoDE-CoTD files."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from mode_cotd.errors import ConfigError, DataError
from mode_cotd.tasks import (
    END,
    SEEN_TASKS,
    TARGET_SEPARATOR,
    TASKS,
    UNSEEN_TASKS,
    Task,
    canonical_number,
    extract_answer,
    format_prompt,
    format_target,
    get_task,
    is_correct,
    parse_target,
    score,
)

# From DESIGN.md and the data README.
DESIGN_SEEN = {"addsub", "aqua", "commonsense_qa", "date_understanding", "gsm8k", "last_letter_concatenation",
               "multiarith", "single_eq", "svamp", "tracking_shuffled_objects"}
DESIGN_UNSEEN = {"coin_flip", "openbook_qa", "reclor", "strategy_qa"}


@pytest.fixture(scope="module")
def golds(data_dir) -> dict[str, list[str]]:
    """Each task's test gold labels, read straight from the JSON (independent of mode_cotd.data)."""
    out = {}
    for name in TASKS:
        with open(data_dir / "evaluation" / f"{name}_test.json", encoding="utf-8") as f:
            out[name] = [r["output"] for r in json.load(f)]
    return out


def _train(data_dir, name: str) -> list[dict]:
    with open(data_dir / "train" / f"{name}_train.json", encoding="utf-8") as f:
        return json.load(f)


def _rationale(data_dir, name: str, index: int) -> tuple[str, str]:
    rationale, answer = parse_target(_train(data_dir, name)[index]["output"])
    return rationale, answer


# --- registry ------------------------------------------------------------------------


def test_registry_matches_design():
    assert len(TASKS) == 14
    assert set(SEEN_TASKS) == DESIGN_SEEN
    assert set(UNSEEN_TASKS) == DESIGN_UNSEEN
    assert all(isinstance(t, Task) and t.name == n for n, t in TASKS.items())
    with pytest.raises(AttributeError):
        TASKS["gsm8k"].seen = False  # frozen


def test_get_task_names_unknown_and_lists_valid():
    assert get_task("gsm8k") is TASKS["gsm8k"]
    assert get_task(TASKS["aqua"]) is TASKS["aqua"]
    with pytest.raises(ConfigError) as err:
        get_task("gsm9k")
    assert "'gsm9k'" in str(err.value) and "gsm8k" in str(err.value) and "strategy_qa" in str(err.value)


def test_unknown_answer_kind():
    with pytest.raises(ConfigError, match="'float'"):
        extract_answer("42", "float")


def test_answer_kinds_fit_the_gold_labels(golds):
    """Each task's kind is the one its test labels have."""
    checks = {
        "number": lambda g: canonical_number(g) is not None,
        "option": lambda g: len(g) == 1 and g in "ABCDEF",
        "yes_no": lambda g: g.lower() in ("yes", "no"),
        "text": lambda g: g.isalpha() and g.islower(),
    }
    for name, labels in golds.items():
        kind = TASKS[name].answer_kind
        assert all(checks[kind](g) for g in labels), name
        others = [k for k in checks if k != kind and k != "text"]
        assert not any(all(checks[k](g) for g in labels) for k in others), name


def test_format_prompt_matches_the_test_files(data_dir):
    with open(data_dir / "evaluation" / "gsm8k_test.json", encoding="utf-8") as f:
        first = json.load(f)[0]["input"]
    question = first.split("\n\nQ: ", 1)[1][: -len("\nA:")]
    assert format_prompt("gsm8k", question) == first
    yes_no = "Infer True(yes) or False(no) for the question."
    assert format_prompt("coin_flip", "Is it?") == f"{yes_no}\n\nIs it?\nA:"
    assert format_prompt("aqua", "Q?").startswith("Infer the correct choice for the question.\n\nQ: Q?")


# --- targets -------------------------------------------------------------------------


def test_format_target():
    assert TARGET_SEPARATOR == "\n\n-->\n\n" and END == " END"
    assert format_target("48 + 24 = 72.", "72") == "48 + 24 = 72.\n\n-->\n\n72 END"
    assert parse_target("48 + 24 = 72.\n\n-->\n\n72 END") == ("48 + 24 = 72.", "72")
    assert parse_target("72") is None


def test_every_train_and_learn_target_round_trips_and_scores(data_dir):
    """parse_target/format_target are inverse on every real target, and each target scores right."""
    files = sorted((data_dir / "train").glob("*_train.json")) + sorted((data_dir / "learn").glob("*.jsonl"))
    assert files
    for path in files:
        name = path.name.removesuffix("_train.json").removesuffix(".jsonl")
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").split("\n")
            records = [json.loads(line) for line in lines if line.strip()]
        else:
            records = json.loads(path.read_text(encoding="utf-8"))
        parsed = [parse_target(r["output"]) for r in records]
        assert all(p is not None and format_target(*p) == r["output"] for p, r in zip(parsed, records)), path
        result = score([r["output"] for r in records], [p[1] for p in parsed], name)
        assert result == {"accuracy": 1.0, "n": len(records), "correct": len(records)}, path


# --- gold against itself, and corrupted --------------------------------------------


def _bare_sentence(gold: str, kind: str) -> str:
    """A prediction without '-->' that states the answer the way rationales do."""
    return {
        "number": f"Adding it all up gives {gold} in total.",
        "option": f"So the answer is ({gold}).",
        "yes_no": f"So the answer is {gold}.",
        "text": f'So the final answer would be "{gold}".',
    }[kind]


def _other_label(gold: str, labels: list[str], kind: str) -> str:
    if kind == "number":
        return str(Decimal(canonical_number(gold)) + 1)
    # another label of the same file that the gold is not part of
    return next(o for o in labels if gold.lower() not in o.lower())


@pytest.mark.parametrize("name", list(TASKS))
def test_gold_against_itself_scores_100(golds, name):
    labels, kind = golds[name], TASKS[name].answer_kind
    perfect = {"accuracy": 1.0, "n": len(labels), "correct": len(labels)}
    assert score([format_target("Let's think.", g) for g in labels], labels, name) == perfect
    assert score([_bare_sentence(g, kind) for g in labels], labels, name) == perfect
    assert score(labels, labels, name) == perfect  # the bare label is its own fallback


@pytest.mark.parametrize("name", list(TASKS))
def test_corrupted_predictions_score_wrong(golds, name):
    labels, kind = golds[name], TASKS[name].answer_kind
    wrong = [_other_label(g, labels, kind) for g in labels]
    for predictions in (
        [format_target("Let's think.", w) for w in wrong],
        [_bare_sentence(w, kind) for w in wrong],
        [""] * len(labels),
        [format_target("Let's think.", "") for _ in labels],
        ["I am not sure."] * len(labels),
    ):
        assert score(predictions, labels, name)["correct"] == 0, (name, predictions[0])


# --- the paper's rules and where this module fixes them -----------------------------


def test_end_is_cut_so_gold_e_and_d_need_their_letter(golds):
    """The paper keeps ' END', so gold E or D matched any answer; here they do not."""
    gold_e = next(g for g in golds["aqua"] if g == "E")
    gold_d = next(g for g in golds["commonsense_qa"] if g == "D")
    assert not is_correct("x\n\n-->\n\nB END", gold_e, "option")
    assert not is_correct("x\n\n-->\n\nA END", gold_d, "option")
    assert is_correct("x\n\n-->\n\nE END", gold_e, "option")
    # what follows END (the student ran past it) is ignored
    assert extract_answer("x\n\n-->\n\nC END\n\nQ: next question (A) 1 (B) 2", "option") == "C"
    assert extract_answer("x\n\n-->\n\n42 END 17", "number") == "42"


def test_last_arrow_is_the_answer(data_dir):
    """Two commonsense_qa rationales contain '-->' themselves; the answer is after the last."""
    outputs = [r["output"] for r in _train(data_dir, "commonsense_qa") if r["output"].count("-->") > 1]
    assert len(outputs) == 2
    assert [extract_answer(o, "option") for o in outputs] == [parse_target(o)[1] for o in outputs]


def test_numbers_are_canonical(golds):
    assert canonical_number("1,000") == "1000"
    assert canonical_number("5.0") == "5" and canonical_number("2.50") == "2.5"
    assert canonical_number("-3.0") == "-3" and canonical_number("abc") is None
    # svamp and single_eq golds carry ".0", gsm8k golds carry thousands commas
    assert "21.0" in golds["svamp"] and "2,125" in golds["gsm8k"]
    assert is_correct("x\n\n-->\n\n21 END", "21.0", "number")
    assert is_correct("The total is 21.", "21.0", "number")
    assert is_correct("x\n\n-->\n\n2125 END", "2,125", "number")
    assert is_correct("So she pays $2,125.00.", "2,125", "number")
    assert is_correct("x\n\n-->\n\n2,125 END", "2125", "number")


def test_a_number_containing_the_gold_is_wrong(golds):
    """The paper counts gold 5 correct for 15 (substring); here the number must be equal."""
    gold = next(g for g in golds["addsub"] if len(g) == 1)
    assert not is_correct(f"x\n\n-->\n\n1{gold} END", gold, "number")
    assert not is_correct(f"So there are 1{gold} left.", gold, "number")
    assert not is_correct(f"x\n\n-->\n\n{gold}1 END", gold, "number")


def test_number_extraction_edge_cases():
    assert extract_answer("x\n\n-->\n\n$18 dollars END", "number") == "18"
    assert extract_answer("She has -3.50 left", "number") == "-3.5"
    assert extract_answer("pages 3-5", "number") == "5"
    assert extract_answer("the lists 1,2,3", "number") == "3"
    assert extract_answer("It is 1,000.", "number") == "1000"
    assert extract_answer("no numbers here", "number") is None
    assert extract_answer("x\n\n-->\n\nmany END", "number") is None


def test_option_extraction():
    assert extract_answer("x\n\n-->\n\n(C) blue ball END", "option") == "C"
    assert extract_answer("x\n\n-->\n\nc END", "option") == "C"  # the paper ignores case
    assert extract_answer("x\n\n-->\n\nAnswer: D END", "option") == "D"
    assert extract_answer("so the answer is b", "option") is None


def test_option_fallback_ignores_letters_inside_words(data_dir):
    """A real tracking_shuffled_objects rationale names Alice, Bob and Claire but no option:
    the paper's A|B|C|D|E|F would take a letter from the names."""
    rationales = [parse_target(r["output"])[0] for r in _train(data_dir, "tracking_shuffled_objects")]
    no_letter = next(r for r in rationales
                     if "Alice" in r and "Claire" in r and extract_answer(r, "option") is None)
    assert not is_correct(no_letter, "C", "option") and not is_correct(no_letter, "A", "option")


def test_yes_no_fallback_needs_a_whole_word():
    """The paper's yes|no finds "no" in "not"/"know" and maps anything else to "no"."""
    assert extract_answer("I do not know.", "yes_no") is None
    assert not is_correct("I do not know.", "no", "yes_no")
    assert not is_correct("", "No", "yes_no")
    assert extract_answer("That is true.", "yes_no") == "yes"
    assert extract_answer("x\n\n-->\n\nFalse END", "yes_no") == "no"
    assert is_correct("x\n\n-->\n\nYes END", "yes", "yes_no")
    assert is_correct("x\n\n-->\n\nyes END", "Yes", "yes_no")


def test_text_answer_after_arrow_is_a_substring_match():
    assert is_correct('x\n\n-->\n\n"yajc". END', "yajc", "text")
    assert is_correct("x\n\n-->\n\nThe answer is YAJC END", "yajc", "text")
    assert not is_correct("x\n\n-->\n\nyaj END", "yajc", "text")


# --- each fallback on a real rationale (the rationale part of a train target) ----------


@pytest.mark.parametrize(("name", "index"), [
    ("gsm8k", 0),                      # "... = 72 clips in April and May."
    ("single_eq", 2),                  # "She needs to add 6 more cups."  (gold 6.0)
    ("aqua", 6),                       # "... difference of 12 is D, 52."
    ("commonsense_qa", 0),             # "... so (C) is the most likely answer."
    ("tracking_shuffled_objects", 12), # "Therefore, the answer is B."
    ("coin_flip", 5),                  # "So, the answer is yes, the coin is still heads up."
    ("strategy_qa", 16),               # "Yes, it does."
    ("strategy_qa", 10),               # "So, no, they did not violate the concept of monogamy."
    ("last_letter_concatenation", 0),  # 'So the final answer would be "yajc".'
])
def test_fallback_on_real_rationales(data_dir, name, index):
    rationale, answer = _rationale(data_dir, name, index)
    assert "-->" not in rationale
    assert is_correct(rationale, answer, TASKS[name].answer_kind)
    assert score([rationale], [answer], name)["correct"] == 1


def test_text_fallback_last_word(data_dir):
    rationale, answer = _rationale(data_dir, "last_letter_concatenation", 0)
    unquoted = rationale.replace('"', "")  # "... So the final answer would be yajc."
    assert extract_answer(unquoted, "text") == answer
    assert not is_correct(unquoted + " Done", answer, "text")


def test_score_checks_lengths():
    assert score(["x\n\n-->\n\n7 END", "8"], ["7", "9"], "gsm8k") == {"accuracy": 0.5, "n": 2, "correct": 1}
    with pytest.raises(DataError, match="2 predictions for 1 gold"):
        score(["1", "2"], ["1"], "gsm8k")
    with pytest.raises(DataError, match="no predictions"):
        score([], [], "gsm8k")
    with pytest.raises(DataError, match="empty gold"):
        is_correct("7", " ", "number")
