"""Few-shot examples as the composition objectives score them: a prompt, a target, and which tokens count.

A shot is the text the student is given and the text it should continue with:

    from the data     Shot(completion_prompt(student_prompt(example)), example.output)   (shot_of)
    from a user       Shot(completion_prompt(prompt), answer + " END")                    (shot_from_text)

where the output is the paper's target ``"<rationale>\\n\\n-->\\n\\n<answer> END"`` or, for a user's
bare answer (no separator), ``"<answer> END"``. shot_pairs tokenizes shots exactly as training does
(format.tokenize_example: the prompt with special tokens, the target without, an eos after it) and
labels the scored tokens:

    whole target    " " + output and eos                          (the few-shot loss)
    answer only     the prompt and " <rationale>\\n\\n-->\\n\\n" are given and masked; "<answer> END" and
                    eos count. A bare answer has no rationale: its whole target " <answer> END" and eos
                    count, the same tokens as the whole target. A data shot without a separator is an
                    error (DataError): it has no answer to score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mode_cotd.data import Example, student_prompt
from mode_cotd.errors import DataError
from mode_cotd.format import IGNORE_INDEX, completion_prompt, completion_target, tokenize_example
from mode_cotd.tasks import END, TARGET_SEPARATOR, parse_target


@dataclass(frozen=True)
class Shot:
    """One shot as texts: the student's prompt and the output it should continue with."""

    prompt: str
    """The prompt exactly as the student is given it (completion_prompt already applied)."""
    output: str
    """``"<rationale>\\n\\n-->\\n\\n<answer> END"`` (tasks.format_target), or ``"<answer> END"`` when ``bare``."""
    bare: bool = False
    """The output is a bare answer without a rationale: answer-only scoring counts all of it."""


def shot_of(example: Example) -> Shot:
    """The shot of a data example: its canonical prompt (data.student_prompt) and its output unchanged."""
    return Shot(completion_prompt(student_prompt(example)), example.output)


def shot_from_text(prompt: str, answer: str) -> Shot:
    """The shot of a user's ``{"prompt", "answer"}`` pair, e.g. for a few-shot search requested at serving.

    ``prompt`` is used as given, as a server tokenizes a request's prompt (no canonical task prompt: the
    task may be unknown). ``answer`` is the paper's target ``"<rationale>\\n\\n-->\\n\\n<answer>"`` or a bare
    answer; surrounding whitespace is stripped and " END" appended unless it already ends so. A bare answer
    (no separator) gives a ``bare`` shot, whose answer-only score is its whole target. DataError for an
    empty or non-string field.
    """
    for name, value in (("prompt", prompt), ("answer", answer)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"shot: {name!r} must be a non-empty string, got {value!r}")
    output = answer.strip()
    output = output if output.endswith(END) else output + END
    return Shot(completion_prompt(prompt), output, bare=TARGET_SEPARATOR not in output)


def shot_texts(shot: Shot, answer_only: bool) -> tuple[str, str]:
    """``(prompt, target)``: the text given and the text scored (module docstring)."""
    if not answer_only or shot.bare:
        return shot.prompt, completion_target(shot.output)
    parsed = parse_target(shot.output)
    if parsed is None:
        raise DataError(f"shot {shot.prompt[:60]!r}: its target has no {TARGET_SEPARATOR!r}, so no answer tokens")
    rationale, answer = parsed
    return shot.prompt + " " + rationale + TARGET_SEPARATOR, answer + END


def shot_pairs(tokenizer, shots: Sequence[Example | Shot], max_length: int,
               answer_only: bool) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per shot, labels IGNORE_INDEX (-100) on the tokens not scored.

    Examples are taken as ``shot_of(example)``. The prompt is kept whole and the target cut to
    ``max_length`` (format.tokenize_example); DataError for a prompt that leaves no room.
    """
    pairs = []
    for shot in shots:
        prompt, target = shot_texts(shot if isinstance(shot, Shot) else shot_of(shot), answer_only)
        pairs.append(tokenize_example(tokenizer, prompt, target, max_length))
    return pairs


def scored_positions(labels: Sequence[int]) -> list[int]:
    """Indices of the scored tokens (labels != IGNORE_INDEX); the logits at index - 1 predict each."""
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
