"""The 14 MoDE-CoTD tasks, their prompt and target formats, and answer scoring.

Formats (as in ``../shared/data/mode-cotd``):

- prompt: ``"<instruction>\\n\\nQ: <question>\\nA:"`` (the yes/no tasks omit ``"Q: "``);
- target: ``"<rationale>\\n\\n-->\\n\\n<answer> END"`` (train and learn files); test files
  hold the gold label only.

Scoring follows the paper's public evaluation (``Xiang-Li-oss/MoDE-CoTD``,
``lora-mixing/evaluate.py``): take the text after the last ``-->``; without one, fall back
to the last number, option letter or yes/no in the whole text; count a prediction correct
when the gold label is a substring of that answer, ignoring case. Where the paper's code
does something that is plainly a bug, this module fixes it, and says so:

1. ``" END"`` and everything after it is cut from the answer. The paper keeps it, so its
   case-insensitive test counts gold ``E`` or ``D`` correct after any ``"X END"``.
2. Fallback patterns match whole tokens. The paper's ``A|B|C|D|E|F`` finds letters inside
   words ("Alice", "Finally"); its ``yes|no`` finds "no" inside "not" and "know".
3. Numbers are canonical before they are compared: thousands commas go (``"1,000"`` is
   ``"1000"``), trailing fractional zeros go (``"5.0"`` is ``"5"``, ``"2.50"`` is ``"2.5"``).
   The gold must equal the answer's number. A digit substring does not count, although
   the paper counts gold ``5`` correct for ``15``, and scores gold ``5.0`` (svamp,
   single_eq) wrong for an answer of ``5``.
4. A yes/no answer that has no yes, no, true or false in it scores as wrong. The paper
   maps anything without "yes" or "true" to "no", so an empty output counts as "no".
5. Text tasks (last_letter_concatenation) fall back to the last quoted string, or
   failing that the last word. The paper's fallback there is the option-letter pattern,
   which cannot match a lowercase four-letter label.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from mode_cotd.errors import ConfigError, DataError

ANSWER_KINDS = ("number", "option", "yes_no", "text")
"""The answer kinds: a number, an option letter A–F, yes/no, or free text."""

INSTRUCTION_ANSWER = "Infer the correct answer for the question."
INSTRUCTION_CHOICE = "Infer the correct choice for the question."
INSTRUCTION_YES_NO = "Infer True(yes) or False(no) for the question."
INSTRUCTIONS = (INSTRUCTION_ANSWER, INSTRUCTION_CHOICE, INSTRUCTION_YES_NO)
"""Every instruction prefix that appears in the data."""

QUESTION_PREFIX = "Q: "
ANSWER_CUE = "\nA:"
"""A prompt ends with this; the student continues with the rationale."""

TARGET_SEPARATOR = "\n\n-->\n\n"
"""Between the rationale and the answer in a target."""
END = " END"
"""Ends every target."""


@dataclass(frozen=True)
class Task:
    """One MoDE-CoTD task (dataset)."""

    name: str
    """Its name, as in the data files (``train/<name>_train.json``...)."""
    seen: bool
    """True: it gets an expert trained on its train file. False: only its 5 shots are used."""
    answer_kind: str
    """One of ANSWER_KINDS; picks the answer extraction and comparison."""
    instruction: str
    """The first line of its prompt, e.g. ``"Infer the correct choice for the question."``."""
    question_prefix: str = QUESTION_PREFIX
    """Put before the question: ``"Q: "``, or ``""`` for the yes/no tasks."""


def _task(name: str, seen: bool, kind: str) -> Task:
    instruction = {"number": INSTRUCTION_ANSWER, "text": INSTRUCTION_ANSWER,
                   "option": INSTRUCTION_CHOICE, "yes_no": INSTRUCTION_YES_NO}[kind]
    prefix = "" if kind == "yes_no" else QUESTION_PREFIX
    return Task(name, seen, kind, instruction, prefix)


# The kinds come from the gold labels of evaluation/<name>_test.json (tests check them).
TASKS: dict[str, Task] = {t.name: t for t in (
    _task("addsub", True, "number"),
    _task("aqua", True, "option"),
    _task("commonsense_qa", True, "option"),
    _task("date_understanding", True, "option"),
    _task("gsm8k", True, "number"),
    _task("last_letter_concatenation", True, "text"),
    _task("multiarith", True, "number"),
    _task("single_eq", True, "number"),
    _task("svamp", True, "number"),
    _task("tracking_shuffled_objects", True, "option"),
    _task("coin_flip", False, "yes_no"),
    _task("openbook_qa", False, "option"),
    _task("reclor", False, "option"),
    _task("strategy_qa", False, "yes_no"),
)}
SEEN_TASKS: tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.seen)
UNSEEN_TASKS: tuple[str, ...] = tuple(n for n, t in TASKS.items() if not t.seen)


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (a Task is returned as is); ConfigError names an unknown one."""
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None


def _kind(kind: str | Task) -> str:
    kind = kind.answer_kind if isinstance(kind, Task) else kind
    if kind not in ANSWER_KINDS:
        raise ConfigError(f"unknown answer kind {kind!r}; valid kinds: {', '.join(ANSWER_KINDS)}")
    return kind


# --- formats -------------------------------------------------------------------------


def format_prompt(task: str | Task, question: str) -> str:
    """The prompt in the data's format: ``"<instruction>\\n\\n[Q: ]<question>\\nA:"``.

    ``format_prompt(ex.task, data.question_of(ex)) == ex.input`` for every test example
    except openbook_qa's, whose test inputs are the bare question.
    """
    task = get_task(task)
    return f"{task.instruction}\n\n{task.question_prefix}{question.strip()}{ANSWER_CUE}"


def format_target(rationale: str, answer: str) -> str:
    """``"<rationale>\\n\\n-->\\n\\n<answer> END"``, the train files' target format."""
    return f"{rationale}{TARGET_SEPARATOR}{answer}{END}"


def parse_target(output: str) -> tuple[str, str] | None:
    """``(rationale, answer)`` from a target, or None when it has no TARGET_SEPARATOR.

    Splits at the last separator (a few rationales contain ``-->`` themselves) and drops
    the final END, so ``format_target(*parse_target(t)) == t`` for every train target.
    """
    if TARGET_SEPARATOR not in output:
        return None
    rationale, answer = output.rsplit(TARGET_SEPARATOR, 1)
    answer = answer.removesuffix(END)
    return rationale, answer


# --- answer extraction ---------------------------------------------------------------

# A number: optional minus (not after a word, e.g. "3-5"), digits with optional thousands
# commas ("1,000", not "1,2"), optional decimals.
_NUMBER = re.compile(r"(?:(?<![\w.-])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_OPTION = re.compile(r"(?<![A-Za-z])[A-F](?![A-Za-z])")
_YES_NO = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”")
_WORD = re.compile(r"\w+")
_END = re.compile(r"\bEND\b")


def canonical_number(text: str) -> str | None:
    """``"1,000"`` -> ``"1000"``, ``"5.0"`` -> ``"5"``, ``"2.50"`` -> ``"2.5"``; None if not a number."""
    try:
        value = Decimal(text.strip().replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def answer_segment(text: str) -> str | None:
    """The text after the last ``-->``, cut at the first ``END``, stripped; None without ``-->``.

    The paper takes ``text.split('-->')[-1]``; cutting at END is fix 1 of the module docstring.
    """
    if "-->" not in text:
        return None
    segment = text.rsplit("-->", 1)[1]
    return _END.split(segment, maxsplit=1)[0].strip()


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return canonical_number(found[-1]) if found else None


def _last_option(text: str) -> str | None:
    found = _OPTION.findall(text)
    return found[-1] if found else None


def _last_yes_no(text: str) -> str | None:
    found = _YES_NO.findall(text)
    if not found:
        return None
    return "yes" if found[-1].lower() in ("yes", "true") else "no"


def _last_quoted_or_word(text: str) -> str | None:
    quoted = _QUOTED.findall(text)
    if quoted:
        return next(q for q in quoted[-1] if q).strip()
    words = _WORD.findall(text)
    return words[-1] if words else None


def extract_answer(text: str, kind: str | Task) -> str | None:
    """The answer a prediction gives, in canonical form, or None when it gives none.

    With ``-->``: the answer segment (see answer_segment), read by kind: its last number
    (canonical_number), its option letter (a lone a–f of any case, else its last
    standalone A–F), its last yes/no/true/false as ``"yes"``/``"no"``, or for text the
    segment itself without surrounding quotes and trailing period.
    Without ``-->`` (the paper's fallback), over the whole text: the last number, the
    last standalone option letter A–F, the last yes/no/true/false, or for text the last
    double-quoted string, else the last word.
    """
    kind = _kind(kind)
    segment = answer_segment(text)
    source = text if segment is None else segment
    if segment == "":
        return None
    if kind == "number":
        return _last_number(source)
    if kind == "yes_no":
        return _last_yes_no(source)
    if kind == "option":
        if segment is not None:
            bare = segment.strip("().: ")
            if len(bare) == 1 and bare.upper() in "ABCDEF":
                return bare.upper()
        return _last_option(source)
    if segment is not None:
        return segment.strip().strip("\"“”'").rstrip(".").strip() or None
    return _last_quoted_or_word(source)


def normalize_gold(gold: str, kind: str | Task) -> str:
    """The gold label in the form extract_answer gives: canonical number, upper letter, yes/no."""
    kind = _kind(kind)
    gold = gold.strip()
    if not gold:
        raise DataError("empty gold label: nothing can be compared with it")
    if kind == "number":
        return canonical_number(gold) or gold
    if kind == "option":
        return gold.upper()
    if kind == "yes_no":
        return {"true": "yes", "false": "no"}.get(gold.lower(), gold.lower())
    return gold


def is_correct(prediction_text: str, gold: str, kind: str | Task) -> bool:
    """The paper's rule: the gold label is a substring of the extracted answer, ignoring case.

    Numbers must match exactly after canonicalisation (fix 3 of the module docstring);
    for option letters and yes/no the extracted answer is one token, so the substring
    test is equality. No answer (None) is wrong.
    """
    kind = _kind(kind)
    gold = normalize_gold(gold, kind)
    answer = extract_answer(prediction_text, kind)
    if answer is None:
        return False
    if kind == "number":
        return answer == gold
    return gold.lower() in answer.lower()


def score(predictions: Sequence[str], golds: Sequence[str], task: str | Task) -> dict:
    """``{"accuracy": correct / n, "n": n, "correct": correct}`` for one task's predictions."""
    task = get_task(task)
    if len(predictions) != len(golds):
        raise DataError(f"{task.name}: {len(predictions)} predictions for {len(golds)} gold labels")
    if not golds:
        raise DataError(f"{task.name}: no predictions to score")
    correct = sum(is_correct(p, g, task.answer_kind) for p, g in zip(predictions, golds))
    return {"accuracy": correct / len(golds), "n": len(golds), "correct": correct}
