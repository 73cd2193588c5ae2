"""How an example becomes the text the student sees: the one definition for training and serving.

The student is trained as a plain completion model:

    prompt  = completion_prompt(example.input)    the data's input as is, ending in "\\nA:"
    target  = completion_target(example.output)   " " + "<rationale>\\n\\n-->\\n\\n<answer> END"

and at inference it is given ``completion_prompt(input)`` and generates the target (greedy,
stopping at eos or " END"). Training tokenizes the prompt and the target *separately* and
concatenates the ids (tokenize_example), so the prompt's ids at training time are exactly
the ids a server gets from tokenizing the same prompt; BPE merges never cross the
prompt/target boundary.
"""

from __future__ import annotations

from mode_cotd.errors import DataError

IGNORE_INDEX = -100
"""Label value the loss skips (torch.nn.CrossEntropyLoss's default ignore_index)."""


def completion_prompt(input_text: str) -> str:
    """The prompt given to the student for an example's ``input``: the input unchanged."""
    return input_text


def completion_target(output_text: str) -> str:
    """The text the student learns to continue the prompt with: ``" " + output``.

    ``output`` is ``<rationale>\\n\\n-->\\n\\n<answer> END`` (tasks.format_target); the space
    separates it from the prompt's final ``"A:"``.
    """
    return " " + output_text


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos (padding is masked out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def tokenize_example(tokenizer, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one example, both of the same length <= ``max_length``.

    ``input_ids = prompt_ids + target_ids + [eos]`` where the prompt is tokenized with the
    tokenizer's special tokens (as a server tokenizes a prompt; a BOS when the tokenizer adds
    one) and the target without. ``labels`` is IGNORE_INDEX over the prompt and equals
    ``input_ids`` over the target and the eos, so the loss covers only the output.

    Truncation keeps the whole prompt and cuts the end of the target; a cut target gets no
    eos (the student must not learn to stop mid-rationale). A prompt that leaves no room for
    a single target token raises DataError (callers skip such examples).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token: a target could not be ended")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"]) + [eos]
    room = max_length - len(prompt_ids)
    if room < 1:
        raise DataError(
            f"prompt of {len(prompt_ids)} tokens leaves no room for the target within max_length={max_length}"
        )
    target_ids = target_ids[:room]
    input_ids = prompt_ids + target_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
    return input_ids, labels
