"""Teacher rationales: from an OpenAI-compatible endpoint, released files, or exact programs.

Every source appends its samples to ``<name>.raw.jsonl`` beside the output, one JSON line
per sample, flushed and fsynced: a record is an Example's fields (task, input, output,
source, model, prompt, sample_index) plus ``gold``, the label the sample is checked
against. A run skips the samples already there, keyed by (model, task, input,
sample_index), so an interrupted run resumes where it stopped; a torn last line (a kill
mid-write) is cut off before appending.

The filter then reads the raw file and writes ``<output>`` (e.g. ``rationales.jsonl``),
atomically, with the samples that have a rationale and whose extracted answer matches the
gold label (tasks.is_correct), and ``<name>.report.json`` with the kept fraction per task.

Gold labels: for the endpoint and programmatic teachers, the question file's label
(Example.gold: the answer of a train/learn target, or a test file's label). Imported
rationale files carry no separate label, so their own answer is the gold: the filter then
checks that each target is well formed and its answer extractable.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mode_cotd.atomic import write_json_atomic
from mode_cotd.data import (
    Example,
    load_examples,
    load_jsonl_examples,
    load_task,
    question_of,
    read_jsonl,
    subsample,
    write_jsonl,
)
from mode_cotd.errors import ConfigError, DataError, ModeCotdError
from mode_cotd.settings import field_docs
from mode_cotd.tasks import TASKS, extract_answer, format_target, get_task, is_correct
from training.programmatic import PROGRAMMATIC_TEACHERS, programmatic_example

ZERO_SHOT_COT = "Q: {question}\nA: Let's think step by step."
"""Zero-shot chain-of-thought prompt (Kojima et al.; Fine-tune-CoT's teacher prompt)."""
API_KINDS = ("chat", "completions")


class TeacherError(ModeCotdError):
    """A teacher endpoint is down, refuses requests, or answers with something that is not an OpenAI response."""


@dataclass
class EndpointConfig:
    """An OpenAI-compatible teacher endpoint and how to sample it."""

    base_url: str
    """Base URL of the OpenAI API, e.g. ``http://127.0.0.1:8000/v1``."""
    model: str
    """Model name sent in each request (and recorded as the samples' ``model``)."""
    api: str = "chat"
    """``"chat"`` (/v1/chat/completions, prompt as one user message) or ``"completions"`` (/v1/completions)."""
    api_key: str = "EMPTY"
    """Bearer token; local servers ignore it. The CLI reads $OPENAI_API_KEY when set."""
    samples: int = 1
    """Samples per question (Fine-tune-CoT's diverse reasoning), with sample_index 0..samples-1."""
    temperature: float | None = None
    """Sampling temperature; None: 0 (greedy) for one sample, 0.7 for several."""
    max_tokens: int = 256
    """Most tokens per rationale."""
    concurrency: int = 8
    """Most requests in flight at once."""
    max_retries: int = 3
    """Retries per request on connection errors, 408/409/429 and 5xx (openai client's exponential backoff)."""
    timeout: float = 120.0
    """Seconds per request attempt."""
    seed: int | None = 0
    """Per-request seed (seed + sample_index) for servers that honour it; None sends none."""
    prompt_template: str = ZERO_SHOT_COT
    """Teacher prompt; ``{question}`` is replaced by the bare question."""

    def sampling_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 0.0 if self.samples == 1 else 0.7


# ----------------------------------------------------------------------------- raw sample file


def raw_path(output: str | Path) -> Path:
    """``rationales.jsonl`` -> ``rationales.raw.jsonl``: every sample, kept or not."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".jsonl") + ".raw.jsonl")


def report_path(output: str | Path) -> Path:
    """``rationales.jsonl`` -> ``rationales.report.json``."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".jsonl") + ".report.json")


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write cut by a kill), so the file holds complete lines only."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            os.fsync(f.fileno())


def append_samples(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Append JSON lines to ``path``, then flush and fsync; returns how many."""
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    if lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
    return len(lines)


def read_samples(path: Path) -> list[tuple[Example, str]]:
    """(example, gold) for each line of a raw sample file ([] when it does not exist)."""
    if not path.exists() or not path.read_bytes().strip():
        return []
    records = read_jsonl(path)
    examples = load_jsonl_examples(path, None)
    for line, record in enumerate(records, start=1):
        if not isinstance(record.get("gold"), str):
            raise DataError(f"{path}: record {line}: missing string field 'gold'")
    return [(e, r["gold"]) for e, r in zip(examples, records)]


def sample_key(example: Example) -> tuple:
    """What identifies a sample for resuming: (model, task, input, sample_index)."""
    return example.model, example.task, example.input, example.sample_index


def add_samples(raw: Path, samples: Iterable[tuple[Example, str]]) -> int:
    """Append the (example, gold) samples whose key is not in ``raw`` yet; returns how many were new."""
    _cut_torn_tail(raw)
    done = {sample_key(e) for e, _ in read_samples(raw)}
    new = [{**e.to_record(), "gold": gold} for e, gold in samples if sample_key(e) not in done]
    return append_samples(raw, new)


# ----------------------------------------------------------------------------- filter


def filter_samples(samples: list[tuple[Example, str]]) -> tuple[list[Example], dict[str, dict]]:
    """Keep samples with a rationale whose answer is correct; per task: counts and kept fraction."""
    kept: list[Example] = []
    stats: dict[str, dict] = {}
    questions: dict[str, set] = collections.defaultdict(set)
    kept_questions: dict[str, set] = collections.defaultdict(set)
    for example, gold in samples:
        task = get_task(example.task)
        s = stats.setdefault(task.name, {"samples": 0, "kept": 0})
        s["samples"] += 1
        questions[task.name].add(example.input)
        if example.rationale is not None and is_correct(example.output, gold, task.answer_kind):
            s["kept"] += 1
            kept_questions[task.name].add(example.input)
            kept.append(example)
    for name, s in stats.items():
        s["kept_fraction"] = s["kept"] / s["samples"]
        s["questions"] = len(questions[name])
        s["questions_kept"] = len(kept_questions[name])
    return kept, stats


def filter_rationales(output: str | Path) -> dict:
    """Filter ``<name>.raw.jsonl`` into ``output`` and write ``<name>.report.json``; return the report."""
    output = Path(output)
    raw = raw_path(output)
    samples = read_samples(raw)
    if not samples:
        raise DataError(f"{raw}: no teacher samples to filter")
    kept, stats = filter_samples(samples)
    write_jsonl(output, kept)
    report = {
        "output": str(output),
        "raw": str(raw),
        "samples": len(samples),
        "kept": len(kept),
        "kept_fraction": len(kept) / len(samples),
        "tasks": stats,
        "sources": sorted({e.source or "" for e, _ in samples}),
        "models": sorted({e.model or "" for e, _ in samples}),
    }
    write_json_atomic(report_path(output), report)
    return report


# ----------------------------------------------------------------------------- sources


def question_examples(task: str, questions_file: str | Path | None = None, data_dir: str | Path | None = None,
                      n: int | None = None, seed: int = 0) -> list[Example]:
    """The questions of ``task``: a file's examples, or the task's shared train split; optionally ``n`` of them."""
    get_task(task)
    examples = load_examples(questions_file, task) if questions_file else load_task(task, "train", data_dir)
    return subsample(examples, n, seed) if n is not None else examples


def programmatic_samples(questions: list[Example]) -> list[tuple[Example, str]]:
    """(rationale example, gold) from the exact teacher of each question's task."""
    return [(programmatic_example(q), q.gold) for q in questions]


def imported_samples(path: str | Path, task: str, model: str = "released") -> list[tuple[Example, str]]:
    """(example, its own answer) for a released rationale file (JSON list or JSONL of {input, output})."""
    counts: collections.Counter = collections.Counter()
    samples = []
    for e in load_examples(path, task):
        index = counts[e.input]
        counts[e.input] += 1
        record = {**e.to_record(), "model": e.model or model, "sample_index": index if e.sample_index is None else e.sample_index}
        samples.append((Example(**record), e.gold))
    return samples


def endpoint_example(config: EndpointConfig, question: Example, prompt: str, completion: str,
                     sample_index: int) -> Example:
    """A sample from a teacher completion: the rationale before any ``-->``, the extracted answer after it."""
    answer = extract_answer(completion, get_task(question.task).answer_kind)
    rationale = completion.split("-->", 1)[0].strip()
    return Example(
        task=question.task, input=question.input,
        output=format_target(rationale, answer) if answer else rationale,
        source=f"openai-{config.api}:{config.base_url}", model=config.model, prompt=prompt,
        sample_index=sample_index,
    )


async def _complete(client, config: EndpointConfig, prompt: str, sample_index: int) -> str:
    """One teacher completion's text; every failure becomes a TeacherError naming the URL."""
    import openai

    kwargs: dict[str, Any] = {"model": config.model, "max_tokens": config.max_tokens,
                              "temperature": config.sampling_temperature(), "n": 1}
    if config.seed is not None:
        kwargs["seed"] = config.seed + sample_index
    where = f"teacher endpoint {config.base_url} ({config.api})"
    try:
        if config.api == "chat":
            response = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kwargs)
            text = response.choices[0].message.content
        else:
            response = await client.completions.create(prompt=prompt, **kwargs)
            text = response.choices[0].text
    except openai.APIConnectionError as exc:
        raise TeacherError(f"{where} is unreachable after {config.max_retries} retries: {exc}") from None
    except openai.APIStatusError as exc:
        raise TeacherError(f"{where} answered HTTP {exc.status_code}: {str(exc.message)[:300]}") from None
    except (openai.APIError, AttributeError, TypeError, IndexError, KeyError, ValueError) as exc:
        raise TeacherError(f"{where} returned a response that is not an OpenAI {config.api} response: "
                           f"{type(exc).__name__}: {str(exc)[:300]}") from None
    if text is not None and not isinstance(text, str):
        raise TeacherError(f"{where} returned a completion that is not text: {text!r:.300}")
    return text or ""


async def _collect(config: EndpointConfig, pending: list[tuple[Example, int]], raw: Path) -> int:
    from openai import AsyncOpenAI

    semaphore = asyncio.Semaphore(config.concurrency)
    written = 0

    async def one(question: Example, sample_index: int) -> None:
        nonlocal written
        prompt = config.prompt_template.format(question=question_of(question))
        async with semaphore:
            completion = await _complete(client, config, prompt, sample_index)
        example = endpoint_example(config, question, prompt, completion, sample_index)
        written += append_samples(raw, [{**example.to_record(), "gold": question.gold}])

    async with AsyncOpenAI(base_url=config.base_url, api_key=config.api_key, max_retries=config.max_retries,
                           timeout=config.timeout) as client:
        try:
            async with asyncio.TaskGroup() as group:
                for question, sample_index in pending:
                    group.create_task(one(question, sample_index))
        except ExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
    return written


def collect_from_endpoint(config: EndpointConfig, questions: list[Example], raw: str | Path) -> int:
    """Ask the endpoint for the samples not yet in ``raw``, appending each as it arrives; returns how many."""
    if config.api not in API_KINDS:
        raise ConfigError(f"api must be one of {API_KINDS}, got {config.api!r}")
    for name in ("samples", "concurrency", "max_tokens"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    raw = Path(raw)
    _cut_torn_tail(raw)
    done = {sample_key(e) for e, _ in read_samples(raw)}
    pending = [(q, i) for q in questions for i in range(config.samples)
               if (config.model, q.task, q.input, i) not in done]
    if not pending:
        return 0
    return asyncio.run(_collect(config, pending, raw))


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="mode-cotd teach", formatter_class=fmt,
                                     description="Collect teacher rationales, filter them by answer, report.")
    sub = parser.add_subparsers(dest="source", required=True)

    def common(p: argparse.ArgumentParser, questions: bool) -> None:
        p.add_argument("--output", type=Path, default=Path("rationales.jsonl"),
                       help="filtered rationales; <name>.raw.jsonl and <name>.report.json go beside it")
        if questions:
            p.add_argument("--task", action="append", required=True, choices=sorted(TASKS), metavar="TASK",
                           help="task (repeatable)")
            p.add_argument("--questions", type=Path, default=None,
                           help="question file (one task only); default: the task's shared train split")
            p.add_argument("--data-dir", type=Path, default=None, help="shared data folder; None: $MODE_COTD_DATA or ../shared/data/mode-cotd")
            p.add_argument("--subsample", type=int, default=None, help="use n questions per task (seeded)")
            p.add_argument("--subsample-seed", type=int, default=0, help="seed of --subsample")

    endpoint = sub.add_parser("endpoint", formatter_class=fmt, help="an OpenAI-compatible endpoint (zero-shot CoT)")
    common(endpoint, questions=True)
    docs, defaults = field_docs(EndpointConfig), EndpointConfig("", "")
    for name, kind in (("base_url", str), ("model", str), ("api", str), ("samples", int), ("temperature", float),
                       ("max_tokens", int), ("concurrency", int), ("max_retries", int), ("timeout", float),
                       ("seed", int), ("prompt_template", str)):
        required = name in ("base_url", "model")
        endpoint.add_argument(f"--{name.replace('_', '-')}", type=kind, required=required, help=docs[name],
                              default=None if required else getattr(defaults, name),
                              choices=API_KINDS if name == "api" else None)

    imported = sub.add_parser("import", formatter_class=fmt, help="a released rationale file (shared data format)")
    common(imported, questions=False)
    imported.add_argument("file", type=Path, help="JSON list or JSONL of {input, output}")
    imported.add_argument("--task", required=True, choices=sorted(TASKS), metavar="TASK", help="its task")
    imported.add_argument("--model", default="released", help="teacher model to record")

    programmatic = sub.add_parser("programmatic", formatter_class=fmt, help="exact teachers: "
                                  + ", ".join(PROGRAMMATIC_TEACHERS))
    common(programmatic, questions=True)
    sub.add_parser("filter", formatter_class=fmt, help="re-run only the filter on <name>.raw.jsonl").add_argument(
        "--output", type=Path, default=Path("rationales.jsonl"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    raw = raw_path(args.output)
    if args.source in ("endpoint", "programmatic"):
        if args.questions is not None and len(args.task) > 1:
            raise ConfigError("--questions takes one --task")
        questions = [q for task in args.task for q in question_examples(
            task, args.questions, args.data_dir, args.subsample, args.subsample_seed)]
        if args.source == "programmatic":
            added = add_samples(raw, programmatic_samples(questions))
        else:
            config = EndpointConfig(
                base_url=args.base_url, model=args.model, api=args.api,
                api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"), samples=args.samples,
                temperature=args.temperature, max_tokens=args.max_tokens, concurrency=args.concurrency,
                max_retries=args.max_retries, timeout=args.timeout, seed=args.seed,
                prompt_template=args.prompt_template)
            added = collect_from_endpoint(config, questions, raw)
    elif args.source == "import":
        added = add_samples(raw, imported_samples(args.file, args.task, args.model))
    else:
        added = 0
    report = filter_rationales(args.output)
    print(json.dumps({"new_samples": added, **report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
