"""Shots as the objectives tokenize them: the former objectives._pairs exactly, and a user's text shots."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mode_cotd.data import Example, load_task, student_prompt
from mode_cotd.errors import DataError
from mode_cotd.format import IGNORE_INDEX, completion_prompt, completion_target, tokenize_example
from mode_cotd.shots import Shot, scored_positions, shot_from_text, shot_of, shot_pairs
from mode_cotd.tasks import END, TARGET_SEPARATOR, format_target, parse_target
from mode_cotd.tiny import build_tiny_tokenizer

EXAMPLES = [
    Example("addsub", "Q: Tom has 2 apples and gets 3 more. How many?\nA:", format_target("2 + 3 = 5.", "5")),
    Example("strategy_qa", "Is the sky green?\n\n###\n\n", format_target("The sky is blue. --> no.", "no")),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()  # byte-level: one token per byte, so labels decode back to the scored text


def _reference_pairs(tokenizer, shots, max_length, answer_only):
    """training/objectives.py::_pairs before the move to mode_cotd.shots, verbatim."""
    pairs = []
    for e in shots:
        prompt, target = completion_prompt(student_prompt(e)), completion_target(e.output)
        if answer_only:
            parsed = parse_target(e.output)
            if parsed is None:
                raise DataError(f"shot {e.input[:60]!r}: its target has no {TARGET_SEPARATOR!r}, so no answer tokens")
            prompt, target = prompt + " " + parsed[0] + TARGET_SEPARATOR, parsed[1] + END
        pairs.append(tokenize_example(tokenizer, prompt, target, max_length))
    return pairs


def _scored_text(tokenizer, pair) -> str:
    input_ids, labels = pair
    return tokenizer.decode([input_ids[i] for i in scored_positions(labels)])


def _outcome(pairs, *args):
    """The pairs, or the DataError's message."""
    try:
        return pairs(*args)
    except DataError as exc:
        return str(exc)


@pytest.mark.parametrize("answer_only", [False, True])
@pytest.mark.parametrize("max_length", [1024, 100, 90])  # everything, a cut target, a prompt too long
def test_data_shots_tokenize_as_the_former_objectives_did(tokenizer, answer_only, max_length):
    for shots in ([e] for e in EXAMPLES):
        args = tokenizer, shots, max_length, answer_only
        assert _outcome(shot_pairs, *args) == _outcome(_reference_pairs, *args)


@pytest.mark.parametrize("task", ["addsub", "strategy_qa", "reclor", "openbook_qa"])
def test_shared_data_shots_tokenize_as_the_former_objectives_did(tokenizer, data_dir, task):
    shots = [e for e in load_task(task, "learn", data_dir) if e.rationale]
    for answer_only in (False, True):
        assert shot_pairs(tokenizer, shots, 8192, answer_only) == _reference_pairs(tokenizer, shots, 8192, answer_only)


def test_the_labels_score_the_target_or_the_answer(tokenizer):
    whole, answer = (shot_pairs(tokenizer, EXAMPLES[:1], 1024, a)[0] for a in (False, True))
    assert _scored_text(tokenizer, whole) == " 2 + 3 = 5.\n\n-->\n\n5 END<|endoftext|>"
    assert _scored_text(tokenizer, answer) == "5 END<|endoftext|>"
    assert answer[0] == whole[0]  # the same tokens; only the labels differ
    assert scored_positions(answer[1]) == [i for i in range(len(answer[1])) if answer[1][i] != IGNORE_INDEX]
    assert scored_positions(answer[1]) == list(range(len(answer[1]) - 6, len(answer[1])))


def test_a_user_shot_in_the_papers_format_is_the_data_shot(tokenizer):
    for e in EXAMPLES:
        shot = shot_from_text(student_prompt(e), e.output.removesuffix(END))
        assert shot == shot_of(e) and not shot.bare
        assert shot_from_text(student_prompt(e), e.output + "\n") == shot  # END kept, whitespace stripped
        for answer_only in (False, True):
            assert shot_pairs(tokenizer, [shot], 1024, answer_only) == shot_pairs(tokenizer, [e], 1024, answer_only)


def test_a_bare_answer_is_scored_whole_after_the_prompt(tokenizer):
    prompt = "Q: Tom has 2 apples and gets 3 more. How many?\nA:"
    shot = shot_from_text(prompt, " 5 ")
    assert shot == Shot(prompt, "5 END", bare=True)
    whole, answer = (shot_pairs(tokenizer, [shot], 1024, a)[0] for a in (False, True))
    assert whole == answer
    assert _scored_text(tokenizer, answer) == " 5 END<|endoftext|>"
    assert tokenizer.decode(answer[0][:scored_positions(answer[1])[0]]) == prompt  # the prompt as given


def test_shots_without_an_answer_or_with_empty_fields_are_refused(tokenizer):
    no_answer = replace(EXAMPLES[0], output="just a rationale END")
    assert shot_pairs(tokenizer, [no_answer], 1024, False)  # the whole target is still scored
    with pytest.raises(DataError, match="no answer tokens"):
        shot_pairs(tokenizer, [no_answer], 1024, True)
    for prompt, answer in (("", "5"), ("Q: x?\nA:", "  "), ("Q: x?\nA:", None)):
        with pytest.raises(DataError, match="non-empty string"):
            shot_from_text(prompt, answer)
    with pytest.raises(DataError, match="no room"):
        shot_pairs(tokenizer, [shot_from_text("x" * 50, "5")], 50, False)
