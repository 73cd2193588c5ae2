"""Exact teachers: step-by-step rationales computed from the question, for tasks that allow it.

Each teacher parses the bare question (data.question_of) and returns ``(rationale,
answer)`` in the style of the shared train files; ``tasks.format_target`` turns them into
the ``<rationale>\\n\\n-->\\n\\n<answer> END`` target. A question a teacher cannot parse
raises DataError quoting it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from mode_cotd.data import Example, question_of
from mode_cotd.errors import ConfigError, DataError
from mode_cotd.tasks import format_target

PROGRAMMATIC_MODEL = "programmatic"
"""The ``model`` provenance of programmatic rationales."""

_LAST_LETTERS = re.compile(r'Take the last letters of each words in "([^"]+)" and concatenate them\.?', re.IGNORECASE)
_COIN_START = re.compile(r"^A coin is (heads|tails) up\.\s*", re.IGNORECASE)
_COIN_STEP = re.compile(r"([^.]+?) (does not flip|flips) the coin\.\s*")
_COIN_END = re.compile(r"^Is the coin still (heads|tails) up\?", re.IGNORECASE)


LAST_LETTER_NAMES = 4
"""How many names a last_letter_concatenation question holds (Kojima et al. draw 4 first names)."""
COMPOUND_NAME_STARTS = frozenset({"Ana", "Anna", "Jean", "Jose", "Juan", "Luis", "Marco", "Maria", "Mary", "Miguel"})
"""First parts of two-word first names ("Juan Pablo", "Mary Ann", "Jose A") in the name lists
the data was generated from. A list with more words than LAST_LETTER_NAMES joins the word
after each such first part (leftmost first) until it holds that many names."""


def _names(quoted: str) -> list[str]:
    words = quoted.split()
    i = 0
    while len(words) > LAST_LETTER_NAMES and i < len(words) - 1:
        if words[i] in COMPOUND_NAME_STARTS:
            words[i:i + 2] = [f"{words[i]} {words[i + 1]}"]
        i += 1
    return words


def last_letter_concatenation(question: str) -> tuple[str, str]:
    """``Take the last letters of each words in "A B" ...`` -> one line per name, then the joined letters."""
    match = _LAST_LETTERS.search(question)
    if not match:
        raise DataError(f"last_letter_concatenation: cannot parse question {question!r}")
    words = _names(match.group(1))
    lines = [f'The last letter of "{word}" is "{word[-1]}".' for word in words]
    answer = "".join(word[-1] for word in words)
    return "\n".join(lines) + f'\n\nSo the final answer is "{answer}".', answer


def coin_flip(question: str) -> tuple[str, str]:
    """``A coin is heads up. X flips the coin. ... Is the coin still heads up?`` -> one line per person."""
    start = _COIN_START.match(question)
    if not start:
        raise DataError(f"coin_flip: cannot parse question {question!r}")
    side, rest = start.group(1).lower(), question[start.end():]
    lines = [f"The coin is {side} up."]
    while (step := _COIN_STEP.match(rest)) is not None:
        person, flips = step.group(1).strip(), step.group(2) == "flips"
        if flips:
            side = "tails" if side == "heads" else "heads"
            lines.append(f"{person} flips the coin, so the coin is now {side} up.")
        else:
            lines.append(f"{person} does not flip the coin, so the coin is still {side} up.")
        rest = rest[step.end():]
    end = _COIN_END.match(rest)
    if not end or len(lines) == 1:
        raise DataError(f"coin_flip: cannot parse question {question!r}")
    asked = end.group(1).lower()
    answer = "yes" if side == asked else "no"
    verdict = "is" if answer == "yes" else "is not"
    lines.append(f"\nThe coin ends {side} up, so the coin {verdict} still {asked} up. The answer is {answer}.")
    return "\n".join(lines), answer


PROGRAMMATIC_TEACHERS: dict[str, Callable[[str], tuple[str, str]]] = {
    "last_letter_concatenation": last_letter_concatenation,
    "coin_flip": coin_flip,
}
"""Task name -> exact teacher (bare question -> (rationale, answer))."""


def programmatic_example(question_example: Example) -> Example:
    """The exact teacher's rationale for a question example, as a rationale Example.

    ``input`` is kept from the question example (the student's prompt); provenance is
    ``source="programmatic:<task>"``, ``model="programmatic"``, ``sample_index=0``.
    """
    task = question_example.task
    teacher = PROGRAMMATIC_TEACHERS.get(task)
    if teacher is None:
        raise ConfigError(
            f"no programmatic teacher for task {task!r}; available: {', '.join(PROGRAMMATIC_TEACHERS)}"
        )
    rationale, answer = teacher(question_of(question_example))
    return Example(
        task=task,
        input=question_example.input,
        output=format_target(rationale, answer),
        source=f"programmatic:{task}",
        model=PROGRAMMATIC_MODEL,
        sample_index=0,
    )
