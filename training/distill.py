"""Expert distillation: one LoRA expert per task over the frozen student (peft), written into a bundle.

The loop is plain torch. Each example is ``format.completion_prompt(input)`` followed by
``format.completion_target(output)`` and eos, tokenized by ``format.tokenize_example``; the
loss is the mean cross-entropy over the target tokens only (labels are -100 on the prompt
and on padding). Batches are padded to their longest example (right padding).

Determinism: the LoRA weights are initialised after ``torch.manual_seed(seed)``; epoch e
visits the examples in the permutation ``numpy.random.default_rng([seed, e])``; micro-batch
m of the run is batch ``m % batches_per_epoch`` of epoch ``m // batches_per_epoch``, so the
data order depends only on the step. Optimizer: AdamW. Learning rate: linear warmup over
``warmup_steps``, then linear decay to 0 at the last step (``schedule="linear"``, as HF's
get_linear_schedule_with_warmup) or constant (``schedule="constant"``), computed from the
step. Together with the checkpointed weights, AdamW state and RNG states
(training/checkpoint.py), a run killed and resumed ends with the same weights as one that
was not.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mode_cotd import paths
from mode_cotd.adapter import LoraAdapter, load_adapter, short_name
from mode_cotd.bundle import MANIFEST, add_expert, create_bundle, read_manifest
from mode_cotd.checksums import file_checksums
from mode_cotd.data import load_examples, read_jsonl, split_path, subsample
from mode_cotd.errors import BundleError, ConfigError, DataError
from mode_cotd.format import IGNORE_INDEX, completion_prompt, completion_target, pad_id, tokenize_example
from mode_cotd.student import load_student, resolve_student, student_identity
from training import checkpoint
from training.distill_config import DistillConfig, parse_args

__all__ = ["DistillConfig", "DistillResult", "distill", "main"]


@dataclass
class DistillResult:
    """What distill() produced."""

    expert_dir: Path | None
    """The expert's folder in the bundle; None when the run stopped early (stop_after_steps)."""
    report: dict
    """The training report (also saved as the expert's report.json)."""


# ----------------------------------------------------------------------------- data


def _train_file(config: DistillConfig) -> Path:
    return Path(config.train_file) if config.train_file else split_path(config.task, "train", config.data_dir)


def load_training_examples(config: DistillConfig, tokenizer) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Tokenized (input_ids, labels) of the task's examples, and counts of what was left out.

    Keeps the records of ``config.task`` that hold a rationale target, subsamples them
    (seeded), and drops those whose prompt alone fills max_length. A JSONL file whose records
    carry a ``task`` field may hold several tasks (a teacher's rationales.jsonl); other files
    are read as the task's. DataError when the file is missing or empty, or when no example
    is left.
    """
    if config.tasks:
        return _load_union(config, tokenizer)
    path = _train_file(config)
    multi_task = path.suffix == ".jsonl" and path.is_file() and any("task" in r for r in read_jsonl(path))
    examples = load_examples(path, None if multi_task else config.task)
    of_task = [e for e in examples if e.task == config.task]
    with_target = [e for e in of_task if e.rationale is not None]
    chosen = subsample(with_target, config.subsample, config.seed) if config.subsample is not None else with_target
    return _tokenize_chosen(config, tokenizer, path, examples, of_task, with_target, chosen)


def _load_union(config: DistillConfig, tokenizer) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """The multi-task (all_data) training set: each of config.tasks from its shared train file, subsampled."""
    from dataclasses import replace

    tokenized, parts = [], {}
    for task in config.tasks:
        single = replace(config, task=task, tasks=None, train_file=None)
        examples, data = load_training_examples(single, tokenizer)
        tokenized.extend(examples)
        parts[task] = data
    digest = hashlib.sha256(json.dumps({t: d["data_sha256"] for t, d in parts.items()}, sort_keys=True).encode())
    return tokenized, {"tasks": parts, "data_sha256": digest.hexdigest(), "examples": len(tokenized)}


def _tokenize_chosen(config, tokenizer, path, examples, of_task, with_target, chosen):
    """Tokenize the chosen examples; the data record (file and example hashes, counts of what was left out)."""
    tokenized, too_long = [], 0
    for e in chosen:
        try:
            tokenized.append(tokenize_example(
                tokenizer, completion_prompt(e.input), completion_target(e.output), config.max_length))
        except DataError:
            too_long += 1
    counts = {"records": len(examples), "other_tasks": len(examples) - len(of_task),
              "without_rationale": len(of_task) - len(with_target), "subsampled_out": len(with_target) - len(chosen),
              "prompt_too_long": too_long, "examples": len(tokenized)}
    if not tokenized:
        raise DataError(f"{path}: no examples of task {config.task!r} left after filtering ({counts})")
    digest = hashlib.sha256()
    for e in chosen:
        digest.update(json.dumps([e.input, e.output], ensure_ascii=False).encode("utf-8") + b"\n")
    with path.open("rb") as f:
        file_sha = hashlib.file_digest(f, "sha256").hexdigest()
    return tokenized, {"file": str(path), "file_sha256": file_sha, "data_sha256": digest.hexdigest(), **counts}


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad to the longest example: input_ids, attention_mask, labels, each [B, T]."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, labels


def micro_batch(examples: list, micro_index: int, batch_size: int, seed: int) -> list:
    """The examples of the run's micro-batch ``micro_index`` (see the module docstring)."""
    import numpy as np

    per_epoch = math.ceil(len(examples) / batch_size)
    epoch, index = divmod(micro_index, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    return [examples[i] for i in order[index * batch_size:(index + 1) * batch_size]]


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


# ----------------------------------------------------------------------------- model


def resolve_device_dtype(config: DistillConfig) -> tuple[str, str]:
    """("cpu"|"cuda", "float32"|"bfloat16") from the config's "auto" values."""
    import torch

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device")
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return device, dtype


def adaptable_modules(model) -> list[str]:
    """Short names of the linear layers a LoRA can target (the output embedding excluded)."""
    import torch

    output = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not output})


def lora_model(config: DistillConfig, model):
    """The student wrapped by peft with a fresh LoRA (seeded); ConfigError for unknown target modules."""
    import torch
    from peft import LoraConfig, get_peft_model

    valid = adaptable_modules(model)
    targets = config.target_modules
    if targets != "all-linear":
        unknown = sorted(set(targets) - set(valid))
        if unknown:
            raise ConfigError(f"target_modules {unknown} are not in the student; valid: {valid} or 'all-linear'")
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets if targets == "all-linear" else list(targets),
                      bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    return peft_model


def merge_shared_adapter(model, folder: str | Path) -> dict:
    """Merge the LoRA in ``folder`` into the student's weights in place (W <- W + s·B·A per target module,
    through peft's merge) and return its record {"path", "files": relative path -> sha256}.

    The student stays frozen; an expert trained on top learns a residual over this shared adapter.
    The adapter is checked by mode_cotd.adapter.load_adapter first (safetensors only, shapes, config),
    and BundleError names a module the student lacks."""
    from peft import PeftModel

    folder = Path(folder)
    adapter = load_adapter(folder)
    missing = sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in adapter.weights}
                     - {name for name, _ in model.named_modules()})
    if missing:
        raise BundleError(f"{folder}: shared adapter targets modules the student lacks: {missing[:3]}")
    merged = PeftModel.from_pretrained(model, folder, is_trainable=False).merge_and_unload()
    if merged is not model:
        raise BundleError(f"{folder}: peft did not merge the shared adapter in place")
    model.requires_grad_(False)
    return {"path": str(folder), "files": file_checksums(folder)}


def _fingerprint(config: DistillConfig, data: dict, student: dict, device: str, dtype: str) -> str:
    kept = {k: v for k, v in asdict(config).items() if k not in DistillConfig.NOT_IN_FINGERPRINT}
    text = json.dumps([kept, data["data_sha256"], student, device, dtype], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- training


def train_step(peft_model, optimizer, examples: list, config: DistillConfig, step: int, total_steps: int,
               pad_id: int, device: str) -> tuple[float, int]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, tokens seen)."""
    import torch

    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    step_loss, step_tokens = 0.0, 0
    for j in range(config.grad_accum):
        batch = micro_batch(examples, step * config.grad_accum + j, config.batch_size, config.seed)
        input_ids, attention_mask, labels = (t.to(device) for t in collate(batch, pad_id))  # [B, T] each
        with torch.autocast(device, dtype=torch.bfloat16, enabled=config.autocast == "bfloat16"):
            loss = peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss  # []
        (loss / config.grad_accum).backward()
        step_loss += loss.item() / config.grad_accum
        step_tokens += int(attention_mask.sum())
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = config.lr * lr_factor(step, total_steps, config.warmup_steps, config.schedule)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return step_loss, step_tokens


def distill(config: DistillConfig) -> DistillResult:
    """Train one LoRA expert for ``config.task`` and write it (with its report) into ``config.bundle``."""
    import torch
    from tqdm import tqdm

    wall_started = time.perf_counter()
    config.validate()
    student_path = resolve_student(config.student)
    identity = student_identity(student_path)
    check_bundle_student(Path(config.bundle), identity, student_path)
    device, dtype = resolve_device_dtype(config)
    model, tokenizer = load_student(student_path, dtype=dtype, device=device)
    shared = merge_shared_adapter(model, config.shared_adapter) if config.shared_adapter else None
    examples, data = load_training_examples(config, tokenizer)
    peft_model = lora_model(config, model)
    parameters = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(parameters.values(), lr=config.lr, weight_decay=config.weight_decay)
    micro_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = config.max_steps or math.ceil(config.epochs * micro_per_epoch / config.grad_accum)
    fingerprint = _fingerprint(config, data, {**identity, "shared_adapter": shared} if shared else identity,
                               device, dtype)
    name = config.expert or config.task
    work_dir = Path(config.work_dir) if config.work_dir else paths.cache_dir() / "distill" / f"{name}-{fingerprint[:12]}"

    state = checkpoint.TrainingState(step=0, fingerprint=fingerprint)
    if not config.resume:
        checkpoint.remove_checkpoints(work_dir)
    latest = checkpoint.latest_checkpoint(work_dir)
    if latest is not None:
        state = checkpoint.load_checkpoint(latest, parameters, optimizer, fingerprint)
    resumed_from = state.step
    end_step = min(total_steps, config.stop_after_steps or total_steps)
    pad = pad_id(tokenizer)
    bar = tqdm(total=total_steps, initial=state.step, desc=f"distill {name}", disable=not config.progress,
               dynamic_ncols=True)
    while state.step < end_step:
        started = time.perf_counter()
        step_loss, step_tokens = train_step(peft_model, optimizer, examples, config, state.step, total_steps,
                                            pad, device)
        state.step += 1
        state.loss_curve.append(step_loss)
        state.tokens += step_tokens
        state.train_seconds += time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{state.tokens / max(state.train_seconds, 1e-9):.0f}")
        if state.step % config.checkpoint_every == 0 or state.step == end_step:
            checkpoint.save_checkpoint(work_dir, state, parameters, optimizer)
    bar.close()

    report = {
        "task": config.task, "expert": name, "student": identity, "shared_adapter": shared,
        "device": device, "dtype": dtype,
        "config": asdict(config), "data": data, "steps": state.step, "total_steps": total_steps,
        "resumed_from_step": resumed_from, "loss_curve": state.loss_curve,
        "final_loss": state.loss_curve[-1] if state.loss_curve else None, "tokens": state.tokens,
        "tokens_per_second": state.tokens / state.train_seconds if state.train_seconds else None,
        "train_seconds": state.train_seconds, "wall_seconds": time.perf_counter() - wall_started,
        "checkpoint": str(work_dir), "fingerprint": fingerprint,
    }
    if state.step < total_steps:
        return DistillResult(expert_dir=None, report=report)
    return DistillResult(expert_dir=write_expert(config, peft_model, identity, student_path, report), report=report)


def check_bundle_student(bundle: Path, identity: dict, student_path: Path) -> None:
    """BundleError when ``bundle`` exists and was made for another student (checked before training)."""
    if (bundle / MANIFEST).exists():
        recorded = read_manifest(bundle).student
        if recorded.config_sha256 != identity["config_sha256"]:
            raise BundleError(f"{bundle / MANIFEST}: bundle is for student {recorded.name!r}, "
                              f"not {identity['name']!r} ({student_path})")


def write_expert(config: DistillConfig, peft_model, identity: dict, student_path: Path, report: dict) -> Path:
    """Add the trained LoRA to the bundle (created for this student when missing) as experts/<name>."""
    from peft import get_peft_model_state_dict

    bundle = Path(config.bundle)
    check_bundle_student(bundle, identity, student_path)
    if not (bundle / MANIFEST).exists():
        create_bundle(bundle, identity)
    import torch

    save_dtype = getattr(torch, config.save_dtype)
    weights = {k: v.detach().to("cpu").to(save_dtype) for k, v in get_peft_model_state_dict(peft_model).items()}
    modules = {k.rsplit(".lora_", 1)[0] for k in weights}
    adapter = LoraAdapter(r=config.r, lora_alpha=float(config.lora_alpha),
                          target_modules=sorted({short_name(m) for m in modules}), weights=weights,
                          base_model_name_or_path=identity["name"])
    name = config.expert or config.task
    add_expert(bundle, name, adapter, config.task, report)
    return bundle / "experts" / name


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    result = distill(config)
    summary = {k: result.report[k] for k in ("task", "expert", "steps", "final_loss", "tokens_per_second",
                                             "train_seconds", "device", "dtype")}
    print(json.dumps({"expert_dir": str(result.expert_dir) if result.expert_dir else None, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
