"""Evaluation: the accuracy of routes on the test sets, through vLLM's offline batched generation.

    test files (seeded subsample) -> prompts -> route plan (training.routes) -> one LoRARequest per folder
        -> vllm.LLM.generate (greedy, all prompts of a route in one batched call) -> tasks.score

Prompts are ``format.completion_prompt(data.student_prompt(example))``, what the experts were
trained on. Decoding is greedy, up to ``max_new_tokens``, stopping after " END" (the end of
every target; scoring cuts there anyway). Accuracy follows mode_cotd.tasks (the paper's rule
with its documented fixes). Per route: per-task accuracy, and the mean over the seen and over
the unseen tasks evaluated (macro averages, as the paper reports them). Written atomically:
``eval.json``, ``eval.md`` (a table: tasks x routes) and ``predictions.jsonl``.

vLLM is imported only when generating. It starts worker processes with "spawn", so a script
that calls `evaluate` needs an ``if __name__ == "__main__":`` guard (`mode-cotd eval` has one).
"""

from __future__ import annotations

import json
import sys
import time
import typing
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mode_cotd.atomic import write_json_atomic, write_text_atomic
from mode_cotd.bundle import load_bundle
from mode_cotd.compute_dtype import resolve_dtype
from mode_cotd.data import load_task, student_prompt, subsample
from mode_cotd.errors import ConfigError
from mode_cotd.format import completion_prompt
from mode_cotd.lora_rank import supported_lora_rank
from mode_cotd.settings import parse_settings
from mode_cotd.student import resolve_student, student_identity
from mode_cotd.tasks import TASKS, get_task, score
from training.routes import LoraChoice, RoutePlanner, parse_route

Generator = Callable[[Sequence[str], Sequence[LoraChoice | None]], list[str]]
"""prompts, one adapter (or None) per prompt -> one generated text per prompt."""


@dataclass
class EvalConfig:
    """Settings of `mode-cotd eval`."""

    bundle: str | None = "bundle"
    """Bundle root; None: only the "base" route can be evaluated."""
    student: str | None = None
    """Student: a local HF folder, or None for the default student."""
    routes: list[str] = field(default_factory=lambda: ["task"])
    """Routes to evaluate: base, expert:<name>, composition:<name>, gate, mixture:{json}, task."""
    tasks: list[str] | None = None
    """Tasks whose test files are used; None: all 14."""
    data_dir: str | None = None
    """Shared data folder; None: $MODE_COTD_DATA or ../shared/data/mode-cotd."""
    max_examples: int | None = None
    """Test examples per task (seeded subsample); None: the whole test file."""
    seed: int = 0
    """Seed of the subsample (and of vLLM)."""
    max_new_tokens: int = 256
    """Most generated tokens per prompt."""
    max_model_len: int = 1024
    """vLLM context length (prompt + generated tokens); longer prompts are scored wrong and counted."""
    dtype: str = "auto"
    """vLLM dtype: "bfloat16", "float16", "float32" or "auto" (the student's; float32 on a CPU without
    bf16 arithmetic, `mode_cotd.compute_dtype`)."""
    max_loras: int = 8
    """vLLM LoRA slots (distinct adapters in one running batch)."""
    max_lora_rank: int | None = None
    """None: vLLM's max_lora_rank fits every adapter exactly. A number: adapters of a higher rank are
    compressed to it by truncated SVD (relative error in eval.json); vLLM's CPU LoRA kernels cost
    time in proportion to this rank, so a low value (e.g. 16) keeps CPU runs of big compositions feasible."""
    max_num_batched_tokens: int | None = None
    """vLLM tokens per engine step (None: vLLM's default); smaller steps stay under the step timeout."""
    step_timeout_s: int | None = None
    """vLLM's time limit for one engine step (VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS; None: vLLM's 300 s)."""
    max_num_seqs: int = 64
    """vLLM sequences per batch."""
    gpu_memory_utilization: float = 0.3
    """Fraction of accelerator memory (host memory on vLLM's CPU backend) vLLM may take."""
    kv_cache_memory_bytes: int | None = None
    """An explicit KV cache size (overrides gpu_memory_utilization for the cache): on vLLM's CPU backend a
    memory fraction is refused when other processes (a training job) hold the rest."""
    enforce_eager: bool = False
    """Skip vLLM's graph capture/compilation (faster start, slower steps)."""
    out_dir: str | None = None
    """Where eval.json, eval.md and predictions.jsonl go; None: <bundle>/reports/eval (or ./eval)."""
    cache_dir: str | None = None
    """Composite adapters; None: <out_dir>/adapters."""

    def validate(self) -> None:
        for task in self.tasks or ():
            get_task(task)
        if not self.routes:
            raise ConfigError("eval: routes: give at least one route")
        for route in self.routes:
            parse_route(route)
        checks = {"max_examples": self.max_examples is None or self.max_examples >= 1,
                  "max_new_tokens": self.max_new_tokens >= 1, "max_model_len": self.max_model_len >= 2,
                  "dtype": self.dtype in ("auto", "bfloat16", "float16", "float32"), "max_loras": self.max_loras >= 1,
                  "max_lora_rank": self.max_lora_rank is None or self.max_lora_rank >= 1,
                  "max_num_batched_tokens": self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
                  "step_timeout_s": self.step_timeout_s is None or self.step_timeout_s >= 1,
                  "max_num_seqs": self.max_num_seqs >= 1, "gpu_memory_utilization": 0 < self.gpu_memory_utilization <= 1,
                  "kv_cache_memory_bytes": self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"eval: {name}: invalid value {getattr(self, name)!r}")

    def output_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        return Path(self.bundle) / "reports" / "eval" if self.bundle else Path("eval")


@dataclass(frozen=True)
class EvalItem:
    """One test prompt."""

    task: str
    """Its task."""
    index: int
    """Its index in the task's test file."""
    prompt: str
    """What the student is given."""
    gold: str
    """The gold label."""


def eval_items(tasks: Sequence[str], data_dir: str | None, max_examples: int | None, seed: int) -> list[EvalItem]:
    """The (subsampled) test prompts of each task, in task order then file order."""
    items = []
    for task in tasks:
        indexed = list(enumerate(load_task(task, "test", data_dir)))
        chosen = subsample(indexed, max_examples, seed) if max_examples else indexed
        items += [EvalItem(task, i, completion_prompt(student_prompt(e)), e.gold) for i, e in chosen]
    return items


# ----------------------------------------------------------------------------- vLLM


class VllmGenerator:
    """Greedy batched generation with per-prompt LoRAs through one offline vllm.LLM."""

    def __init__(self, student: Path, config: EvalConfig, max_rank: int, adapters: int):
        import os

        from vllm import LLM, SamplingParams
        from vllm.config.lora import MaxLoRARanks

        if config.step_timeout_s is not None:  # read by the engine process, which inherits the environment
            os.environ["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] = str(config.step_timeout_s)
        extra: dict = {"enable_lora": True, "max_lora_rank": supported_lora_rank(max_rank, typing.get_args(MaxLoRARanks)),
                       "max_loras": max(1, min(config.max_loras, adapters)),
                       "max_cpu_loras": max(1, adapters)} if adapters else {}
        if config.max_num_batched_tokens is not None:
            extra["max_num_batched_tokens"] = config.max_num_batched_tokens
        if config.kv_cache_memory_bytes is not None:
            extra["kv_cache_memory_bytes"] = config.kv_cache_memory_bytes
        self.llm = LLM(model=str(student), tokenizer=str(student), dtype=resolve_dtype(config.dtype, student),
                       max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
                       gpu_memory_utilization=config.gpu_memory_utilization, enforce_eager=config.enforce_eager,
                       seed=config.seed, **extra)
        self.params = SamplingParams(temperature=0.0, max_tokens=config.max_new_tokens, stop=[" END"],
                                     include_stop_str_in_output=True)
        self.ids: dict[str, int] = {}

    def __call__(self, prompts: Sequence[str], choices: Sequence[LoraChoice | None]) -> list[str]:
        from vllm.lora.request import LoRARequest

        requests = []
        for choice in choices:
            if choice is None:
                requests.append(None)
                continue
            lora_id = self.ids.setdefault(choice.name, len(self.ids) + 1)
            requests.append(LoRARequest(choice.name, lora_id, str(choice.path)))
        outputs = self.llm.generate(list(prompts), self.params, lora_request=requests, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]

    def close(self) -> None:
        """Stop vLLM's engine core and worker processes now (they hold the KV cache's memory until then)."""
        self.llm.llm_engine.engine_core.shutdown()


# ----------------------------------------------------------------------------- scoring and reports


def summarise(items: Sequence[EvalItem], predictions: Sequence[str], skipped: set[int]) -> dict:
    """Per-task {accuracy, n, correct, seen, too_long} and macro averages over seen/unseen/all tasks."""
    by_task: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_task.setdefault(item.task, []).append(i)
    tasks = {}
    for task, rows in by_task.items():
        result = score([predictions[i] for i in rows], [items[i].gold for i in rows], task)
        tasks[task] = {**result, "seen": get_task(task).seen, "too_long": sum(i in skipped for i in rows)}

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {"tasks": tasks,
            "seen_average": mean([t["accuracy"] for t in tasks.values() if t["seen"]]),
            "unseen_average": mean([t["accuracy"] for t in tasks.values() if not t["seen"]]),
            "average": mean([t["accuracy"] for t in tasks.values()])}


def markdown_table(results: dict[str, dict], tasks: Sequence[str]) -> str:
    """Tasks as rows, routes as columns, accuracy in percent; the averages as the last rows."""
    def cell(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f}"

    routes = list(results)
    lines = ["| task | seen | n | " + " | ".join(f"`{r}`" for r in routes) + " |",
             "|---|---|---|" + "---|" * len(routes)]
    for task in tasks:
        n = results[routes[0]]["tasks"][task]["n"]
        seen = "yes" if get_task(task).seen else "no"
        lines.append(f"| {task} | {seen} | {n} | " + " | ".join(
            cell(results[r]["tasks"][task]["accuracy"]) for r in routes) + " |")
    for key, title in (("seen_average", "seen average"), ("unseen_average", "unseen average"),
                       ("average", "average")):
        lines.append(f"| **{title}** | | | " + " | ".join(cell(results[r][key]) for r in routes) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class EvalResult:
    """What evaluate() produced."""

    report: dict
    """The content of eval.json."""
    out_dir: Path
    """Where eval.json, eval.md and predictions.jsonl were written."""


def too_long(student: Path, prompts: Sequence[str], max_model_len: int) -> set[int]:
    """Indices of prompts that leave no room for one generated token within max_model_len."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(student))
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    return {i for i, n in enumerate(lengths) if n >= max_model_len}


def evaluate(config: EvalConfig, generator: Generator | None = None) -> EvalResult:
    """Score every route of ``config`` on the test sets; ``generator`` defaults to VllmGenerator."""
    config.validate()
    started = time.perf_counter()
    student = resolve_student(config.student)
    out_dir = config.output_dir()
    bundle = load_bundle(config.bundle, student=student, strict=True) if config.bundle else None
    planner = RoutePlanner(bundle, student, Path(config.cache_dir) if config.cache_dir else out_dir / "adapters",
                           max_rank=config.max_lora_rank or RoutePlanner.max_rank)
    tasks = list(config.tasks or TASKS)
    items = eval_items(tasks, config.data_dir, config.max_examples, config.seed)
    skipped = too_long(student, [i.prompt for i in items], config.max_model_len)
    kept = [i for i in range(len(items)) if i not in skipped]
    routes = [parse_route(r) for r in config.routes]
    plans = {r.label: planner.plan(r, [items[i].prompt for i in kept], [items[i].task for i in kept]) for r in routes}
    adapters = {c.name: c for plan in plans.values() for c in plan if c is not None}
    if generator is None:
        generator = VllmGenerator(student, config, max((c.rank for c in adapters.values()), default=1), len(adapters))
    planned = time.perf_counter()

    results, records = {}, []
    for label, plan in plans.items():
        texts = dict(zip(kept, generator([items[i].prompt for i in kept], plan)))
        predictions = [texts.get(i, "") for i in range(len(items))]
        results[label] = summarise(items, predictions, skipped)
        used = Counter(c.name if c else "base" for c in plan)
        results[label]["adapters"] = dict(used.most_common())
        choice_of = dict(zip(kept, plan))
        for i, item in enumerate(items):
            choice = choice_of.get(i)
            records.append({"route": label, "task": item.task, "index": item.index, "gold": item.gold,
                            "prediction": predictions[i], "adapter": choice.name if choice else None,
                            "experts": dict(choice.experts) if choice else {}})
    report = {
        "routes": results, "route_order": list(results), "tasks": tasks, "student": student_identity(student),
        "bundle": str(config.bundle) if config.bundle else None, "examples": len(items), "too_long": len(skipped),
        "adapters": {name: {"path": str(c.path), "rank": c.rank, "experts": dict(c.experts)}
                     for name, c in adapters.items()},
        "svd_compressions": planner.compressions, "config": asdict(config),
        "seconds": {"plan": round(planned - started, 3), "total": round(time.perf_counter() - started, 3)},
    }
    write_text_atomic(out_dir / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_text_atomic(out_dir / "eval.md", markdown_table(results, tasks))
    write_json_atomic(out_dir / "eval.json", report)
    return EvalResult(report, out_dir)


def main(argv: list[str] | None = None) -> int:
    config = parse_settings(EvalConfig, argv, "mode-cotd eval",
                            "Accuracy of routes (base, expert:<name>, composition:<name>, gate, mixture:{json}, "
                            "task) on the test sets, with vLLM's offline batched generation.")
    result = evaluate(config)
    print((result.out_dir / "eval.md").read_text(), end="")
    print(json.dumps({"report": str(result.out_dir / "eval.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
