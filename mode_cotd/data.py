"""Examples (rationale records), loaders for the shared MoDE-CoTD data, splits and JSONL I/O.

The shared data (``paths.data_dir()``, see its README) has three splits per task:

=========  ===================================  ========================================
split      file                                 ``output``
=========  ===================================  ========================================
train      ``train/<task>_train.json``          ``<rationale>\\n\\n-->\\n\\n<answer> END``
learn      ``learn/<task>.jsonl`` (5 shots)     the same
test       ``evaluation/<task>_test.json``      the gold label only
=========  ===================================  ========================================

Inputs come in several prompt variants (``"<instruction>\\n\\nQ: ...\\nA:"``, the raw
Fine-tune-CoT ``"...\\n\\n###\\n\\n"``, openbook_qa's ``"... Q: ...\\nA: Let's think step by
step."`` and its bare test questions); ``question_of`` reduces each to the bare question and
``student_prompt`` rebuilds the one canonical prompt (``tasks.format_prompt``).

Every malformed file raises DataError naming the file and the record: records count from 1
("record 4 (index 3)"), JSONL lines from 1.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mode_cotd import paths
from mode_cotd.atomic import write_text_atomic
from mode_cotd.errors import ConfigError, DataError
from mode_cotd.tasks import ANSWER_CUE, INSTRUCTIONS, QUESTION_PREFIX, format_prompt, get_task, parse_target

SPLITS = ("train", "learn", "test")
"""The splits of the shared data; see split_path."""

RAW_PROMPT_END = "\n\n###\n\n"
"""The Fine-tune-CoT prompt suffix (coin_flip and strategy_qa train/learn inputs)."""
_STEP_BY_STEP = ANSWER_CUE + " Let's think step by step."

_OPTIONAL_STR = ("task", "rationale", "answer", "source", "model", "prompt")

T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One example: a prompt and its target, with where it came from.

    ``rationale`` and ``answer`` are parsed from ``output`` when it holds the target
    separator and neither is given.
    """

    task: str
    """The task's name (a key of tasks.TASKS for the shared data)."""
    input: str
    """The prompt, in any of the data's variants (see question_of)."""
    output: str
    """The target ``<rationale>\\n\\n-->\\n\\n<answer> END``, or a test file's gold label."""
    rationale: str | None = None
    """The reasoning before the separator; None for a bare gold label."""
    answer: str | None = None
    """The answer after the separator, without END; None for a bare gold label."""
    source: str | None = None
    """Where it came from: a data file's path, or a teacher's description."""
    model: str | None = None
    """The teacher model that wrote the rationale, when known."""
    prompt: str | None = None
    """The exact prompt sent to the teacher, when it differs from ``input``."""
    sample_index: int | None = None
    """Which of the teacher's samples for this input it is (0-based), when it sampled several."""

    def __post_init__(self) -> None:
        if self.rationale is None and self.answer is None:
            parsed = parse_target(self.output)
            if parsed is not None:
                object.__setattr__(self, "rationale", parsed[0])
                object.__setattr__(self, "answer", parsed[1])

    @property
    def gold(self) -> str:
        """The label to score against: ``answer`` when parsed, else the whole ``output``."""
        return self.answer if self.answer is not None else self.output.strip()

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict: task, input, output, and every provenance field that is set.

        rationale and answer are written only when they are not what ``output`` parses to.
        """
        record: dict[str, Any] = {"task": self.task, "input": self.input, "output": self.output}
        if (self.rationale, self.answer) != (parse_target(self.output) or (None, None)):
            record["rationale"], record["answer"] = self.rationale, self.answer
        for key in ("source", "model", "prompt", "sample_index"):
            value = getattr(self, key)
            if value is not None:
                record[key] = value
        return record


# --- prompt variants ------------------------------------------------------------------


def question_of(example: Example | str) -> str:
    """The bare question of an example (or of an input string), from any prompt variant.

    Strips the instruction line, ``"Q: "``, the trailing ``"\\nA:"`` or
    ``"\\nA: Let's think step by step."``, the raw ``"\\n\\n###\\n\\n"`` suffix, and the literal
    ``\\n`` escape that reclor's learn inputs carry before ``"\\nA:"``.
    """
    text = example.input if isinstance(example, Example) else example
    text = text.removesuffix(RAW_PROMPT_END)
    for instruction in INSTRUCTIONS:
        if text.startswith(instruction):
            text = text[len(instruction):].lstrip()
            break
    if text.startswith(QUESTION_PREFIX.strip()):
        text = text[len(QUESTION_PREFIX.strip()):].lstrip()
    for suffix in (_STEP_BY_STEP, ANSWER_CUE):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    text = text.rstrip()
    text = text.removesuffix("\\n")
    return text.strip()


def student_prompt(example: Example) -> str:
    """The canonical prompt for ``example``: ``format_prompt(task, question_of(example))``."""
    return format_prompt(example.task, question_of(example))


# --- reading -------------------------------------------------------------------------


def _read_text(path: Path, expected: str) -> str:
    if not path.exists():
        raise DataError(f"{path}: file not found; expected {expected}")
    if not path.is_file():
        raise DataError(f"{path}: not a file; expected {expected}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        f"expected {expected}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); expected {expected}") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty; expected {expected}")
    return text


def _where(path: Path, index: int, line: int | None = None) -> str:
    record = f"record {index + 1} (index {index})"
    return f"{path}, line {line}, {record}" if line is not None else f"{path}, {record}"


def _example(record: Any, task: str | None, where: str, source: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with string fields 'input' and 'output', "
                        f"got {type(record).__name__}")
    for key in ("input", "output"):
        if key not in record:
            raise DataError(f"{where}: missing field {key!r}")
        if not isinstance(record[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    for key in _OPTIONAL_STR:
        if record.get(key) is not None and not isinstance(record[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    index = record.get("sample_index")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
        raise DataError(f"{where}: field 'sample_index' must be an integer >= 0, got {index!r}")
    record_task = record.get("task")
    if task is not None and record_task is not None and record_task != task:
        raise DataError(f"{where}: record is for task {record_task!r}, expected {task!r}")
    if task is None and record_task is None:
        raise DataError(f"{where}: no 'task' field, and no task was given for the file")
    return Example(
        task=task or record_task, input=record["input"], output=record["output"],
        rationale=record.get("rationale"), answer=record.get("answer"),
        source=record.get("source") or source, model=record.get("model"),
        prompt=record.get("prompt"), sample_index=index,
    )


def _jsonl_objects(path: Path, expected: str) -> Iterator[tuple[str, Any]]:
    """(where, value) for each non-blank line; splits on "\n" only (JSON escapes newlines,
    and str.splitlines would also split at U+2028 inside a string)."""
    text = _read_text(path, expected)
    index = 0
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = _where(path, index, line_no)
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON at column {exc.colno}: {exc.msg}") from None
        yield where, value
        index += 1


def read_jsonl(path: str | Path, allow_empty: bool = False) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, one per non-blank line.

    DataError for a missing or (unless ``allow_empty``) empty file, and for a line that is
    not valid JSON or not an object, naming the file and the line.
    """
    path = Path(path)
    if allow_empty and path.is_file() and not path.read_bytes().strip():
        return []
    records = []
    for where, value in _jsonl_objects(path, "a JSON-lines file, one object per line"):
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
        records.append(value)
    return records


def load_jsonl_examples(path: str | Path, task: str | None) -> list[Example]:
    """Examples from a JSON-lines file of ``{"input", "output", ...}`` objects.

    ``task=None`` takes each record's own ``"task"`` field (as write_jsonl writes it).
    """
    path = Path(path)
    expected = 'a JSON-lines file, one {"input": str, "output": str} object per line'
    return [_example(value, task, where, str(path)) for where, value in _jsonl_objects(path, expected)]


def load_json_examples(path: str | Path, task: str | None) -> list[Example]:
    """Examples from a JSON file holding a list of ``{"input", "output", ...}`` objects."""
    path = Path(path)
    expected = 'a JSON list of {"input": str, "output": str} objects'
    text = _read_text(path, expected)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected {expected}, got a JSON {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: the list is empty; expected {expected}")
    return [_example(r, task, _where(path, i, None), str(path)) for i, r in enumerate(records)]


def load_examples(path: str | Path, task: str | None) -> list[Example]:
    """load_jsonl_examples for ``*.jsonl``, else load_json_examples."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return load_jsonl_examples(path, task)
    return load_json_examples(path, task)


def split_path(task: str, split: str, data_dir: str | Path | None = None) -> Path:
    """Where ``split`` of ``task`` lives under ``data_dir`` (default ``paths.data_dir()``)."""
    get_task(task)
    root = Path(data_dir) if data_dir is not None else paths.data_dir()
    if split == "train":
        return root / "train" / f"{task}_train.json"
    if split == "learn":
        return root / "learn" / f"{task}.jsonl"
    if split == "test":
        return root / "evaluation" / f"{task}_test.json"
    raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def load_task(task: str, split: str, data_dir: str | Path | None = None) -> list[Example]:
    """The examples of one split of one task from the shared data.

    A split the data lacks (reclor has no train file, coin_flip no learn file) raises
    DataError naming the path that was looked for.
    """
    path = split_path(task, split, data_dir)
    if not path.exists():
        raise DataError(f"{path}: file not found; expected the {split} split of task {task!r} "
                        f"(see the data README in {path.parent.parent})")
    return load_examples(path, task)


# --- splitting and writing -----------------------------------------------------------


def train_val_split(examples: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded split into (train, validation); each keeps the input order.

    ``round(n * val_fraction)`` examples go to validation, at least one when
    ``val_fraction > 0`` and at least one stays in train when n >= 2. The same seed and
    input give the same split; the two parts are disjoint and together hold every example.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(examples)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    val_idx = set(random.Random(seed).sample(range(n), n_val))
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val


def subsample(examples: Sequence[T], n: int, seed: int) -> list[T]:
    """``n`` examples drawn without replacement with ``seed``, in input order (all when n >= len)."""
    if n < 0:
        raise ConfigError(f"subsample size must be >= 0, got {n}")
    if n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def write_jsonl(path: str | Path, records: Iterable[Example | dict[str, Any]]) -> int:
    """Write records (Examples or dicts) as JSON lines, atomically; returns how many."""
    lines = [json.dumps(r.to_record() if isinstance(r, Example) else r, ensure_ascii=False) for r in records]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)
