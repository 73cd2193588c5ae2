"""The training/inference text of an example, tokenized with the tiny byte-level tokenizer."""

from __future__ import annotations

import pytest

from mode_cotd.data import load_task
from mode_cotd.errors import DataError
from mode_cotd.format import IGNORE_INDEX, completion_prompt, completion_target, tokenize_example
from mode_cotd.tasks import TARGET_SEPARATOR
from mode_cotd.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_prompt_is_the_input_and_target_is_space_plus_output(data_dir):
    example = load_task("last_letter_concatenation", "train", data_dir)[0]
    assert completion_prompt(example.input) == example.input
    assert example.input.endswith("\nA:")
    target = completion_target(example.output)
    assert target == " " + example.output
    assert TARGET_SEPARATOR in target and target.endswith(" END")


def test_labels_mask_the_prompt_and_cover_target_and_eos(tokenizer):
    prompt, target = "Q: ab\nA:", " ba\n\n-->\n\nab END"
    input_ids, labels = tokenize_example(tokenizer, prompt, target, max_length=512)
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    assert input_ids == prompt_ids + target_ids + [tokenizer.eos_token_id]
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + target_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(input_ids[len(prompt_ids):-1]) == target


def test_prompt_and_target_are_tokenized_separately():
    """With a real BPE the joint tokenization may merge across the boundary; separate ids match serving."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "a": 1, "b": 2, "ab": 3}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    joint = fast("ab")["input_ids"]
    input_ids, labels = tokenize_example(fast, "a", "b", max_length=8)
    assert joint == [3]
    assert input_ids == [1, 2, 0]
    assert labels == [IGNORE_INDEX, 2, 0]


def test_truncation_keeps_the_prompt_and_cuts_the_target_without_eos(tokenizer):
    prompt, target = "P" * 10, " " + "t" * 50
    input_ids, labels = tokenize_example(tokenizer, prompt, target, max_length=20)
    assert len(input_ids) == len(labels) == 20
    assert tokenizer.decode(input_ids[:10]) == prompt
    assert labels[:10] == [IGNORE_INDEX] * 10
    assert tokenizer.eos_token_id not in input_ids
    assert tokenizer.decode(input_ids[10:]) == target[:10]


def test_exact_fit_keeps_the_eos(tokenizer):
    input_ids, labels = tokenize_example(tokenizer, "P" * 10, "t" * 9, max_length=20)
    assert len(input_ids) == 20 and input_ids[-1] == labels[-1] == tokenizer.eos_token_id


def test_a_prompt_that_fills_max_length_is_refused(tokenizer):
    with pytest.raises(DataError, match="no room for the target"):
        tokenize_example(tokenizer, "P" * 20, " t", max_length=20)
