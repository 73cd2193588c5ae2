"""The student's eos: training ends targets with it, so it must be a token that generation stops on."""

from __future__ import annotations

import json
import shutil

import pytest

from mode_cotd.errors import StudentError
from mode_cotd.format import tokenize_example
from mode_cotd.student import load_student, resolve_student, stop_token_ids


def test_tiny_student_loads_and_its_targets_end_with_a_stop_token(tiny_student):
    _, tokenizer = load_student(tiny_student)
    _, labels = tokenize_example(tokenizer, "Q: 1+1?\nA:", " 2 END", max_length=64)
    assert labels[-1] in stop_token_ids(tiny_student)


def test_a_tokenizer_whose_eos_the_model_does_not_stop_on_is_refused(tiny_student, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(tiny_student, student)
    for name in ("generation_config.json", "config.json"):
        file = student / name
        if file.is_file():
            config = json.loads(file.read_text())
            config["eos_token_id"] = [config["eos_token_id"] + 1] if "eos_token_id" in config else [1]
            file.write_text(json.dumps(config))
    with pytest.raises(StudentError, match="would not stop"):
        load_student(student)


@pytest.mark.real_student
def test_default_student_targets_end_with_the_eos_vllm_stops_on():
    """The default experts once learned `<|im_start|>` (id 1) as their end, from a tokenizer of another
    conversion, and ran on to max_tokens; the converted student's own tokenizer ends targets with id 2."""
    from transformers import AutoTokenizer

    path = resolve_student(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    _, labels = tokenize_example(tokenizer, "Q: 1+1?\nA:", " 2 END", max_length=64)
    assert labels[-1] == tokenizer.eos_token_id and labels[-1] in stop_token_ids(path) == {2}
