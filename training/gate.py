"""Gate training: teach the router which expert a prompt belongs to.

    prompts of each expert's task (train files) -> featuriser -> features [N, D]   (once)
    gate: features [B, D] -> logits [B, E];  loss = cross-entropy(logits, expert index)

Each expert in the bundle was distilled on one task; the prompts of that task's train file
are labelled with the expert's index. Prompts are the canonical student prompts
(``format.completion_prompt(data.student_prompt(example))``, what evaluation sends),
de-duplicated within a task, capped per task with a seeded subsample, and split per task
into train and held-out validation (seeded, ``data.train_val_split``). Features are
computed once, so training is a few seconds of AdamW on a small network. The report gives
the top-1 ``routing_accuracy`` on the held-out prompts (argmax of the logits equals the
prompt's expert), the class-balanced accuracy, per-task accuracy and the confusion matrix
(rows: true task, columns: routed task). The gate is saved into the bundle with its report
(``bundle.set_gate``), and the report is also written to ``reports/gate.json``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mode_cotd.atomic import write_json_atomic
from mode_cotd.bundle import load_bundle, set_gate
from mode_cotd.data import load_examples, load_task, student_prompt, subsample, train_val_split
from mode_cotd.errors import ConfigError, DataError
from mode_cotd.featurise import make_featuriser
from mode_cotd.format import completion_prompt
from mode_cotd.gate import Gate, GateConfig
from mode_cotd.settings import parse_settings
from mode_cotd.student import resolve_student, student_identity

FEATURE_CHUNK = 512
"""Prompts featurised per call (bounds the memory of one call)."""


@dataclass
class GateTrainConfig:
    """Settings of `mode-cotd train-gate`."""

    bundle: str = "bundle"
    """Bundle root holding the experts; the gate is written into it."""
    student: str | None = None
    """Student: a local HF folder, or None for the default student (its embeddings feed the gate)."""
    experts: list[str] | None = None
    """Experts the gate routes to, in logit order; None: every expert in the bundle."""
    train_files: dict[str, str] | None = None
    """Task -> file of its prompts (JSON list or JSONL); None or a missing task: the task's shared train split."""
    data_dir: str | None = None
    """Shared data folder; None: $MODE_COTD_DATA or ../shared/data/mode-cotd."""
    max_per_task: int | None = 1000
    """Prompts per task (seeded subsample) before the split; None: all."""
    val_fraction: float = 0.2
    """Fraction of each task's prompts held out for validation."""
    hidden_dim: int = 512
    """Width of the gate's hidden layer (GELU); 0: a linear gate."""
    temperature: float = 1.0
    """Softmax temperature the saved gate routes with."""
    top_k: int = 2
    """Experts the saved gate mixes per prompt (capped at the number of experts)."""
    grid: float = 0.05
    """Grid the saved gate rounds mixture weights to (1/n)."""
    featuriser: str = "embedding_mean"
    """Featuriser (mode_cotd.featurise.FEATURISERS) that turns prompts into the gate's input."""
    steps: int = 500
    """AdamW steps."""
    batch_size: int = 256
    """Prompts per step (drawn with replacement, seeded)."""
    lr: float = 3e-3
    """AdamW learning rate (constant)."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    class_balanced: bool = True
    """Weight the loss of each task by N / (E * n_task), so small tasks count as much as large ones."""
    seed: int = 0
    """Seed of the subsample, the split, the gate's init and the batches."""
    report: str | None = None
    """Where the JSON report goes; None: <bundle>/reports/gate.json."""

    def validate(self) -> None:
        """ConfigError naming the first invalid field."""
        checks = {
            "max_per_task": self.max_per_task is None or self.max_per_task >= 2,
            "val_fraction": 0 < self.val_fraction < 1, "hidden_dim": self.hidden_dim >= 0,
            "steps": self.steps >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0, "temperature": self.temperature > 0, "top_k": self.top_k >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"train-gate: {name}: invalid value {getattr(self, name)!r}")


@dataclass
class RoutingSplit:
    """Prompts and expert labels, split into train and held-out validation."""

    train_prompts: list[str]
    """Training prompts."""
    train_labels: list[int]
    """Expert index of each training prompt."""
    val_prompts: list[str]
    """Held-out prompts."""
    val_labels: list[int]
    """Expert index of each held-out prompt."""
    counts: dict[str, dict[str, int]]
    """Task -> {"file", "unique", "used", "train", "val"} prompt counts."""


def expert_tasks(bundle_root: str | Path, experts: list[str] | None, student: Path) -> dict[str, str]:
    """Expert name -> its task, in gate order, from a validated bundle; ConfigError when two share a task."""
    bundle = load_bundle(bundle_root, student=student, strict=True)
    names = list(bundle.experts) if experts is None else list(experts)
    unknown = sorted(set(names) - set(bundle.experts))
    if unknown:
        raise ConfigError(f"train-gate: experts {unknown} are not in the bundle {bundle_root}; "
                          f"it has {sorted(bundle.experts)}")
    if len(names) < 2:
        raise ConfigError(f"train-gate: a gate needs at least 2 experts, the bundle {bundle_root} gives {names}")
    tasks = {name: bundle.experts[name].record.task for name in names}
    seen: dict[str, str] = {}
    for name, task in tasks.items():
        if task in seen:
            raise ConfigError(f"train-gate: experts {seen[task]!r} and {name!r} both serve task {task!r}; "
                              "pick one with `experts`")
        seen[task] = name
    return tasks


def task_prompts(task: str, config: GateTrainConfig) -> list[str]:
    """The canonical prompts of one task's train file (or its configured file), in file order."""
    files = config.train_files or {}
    if task in files:
        path = Path(files[task])
        examples = [e for e in load_examples(path, None if path.suffix == ".jsonl" else task) if e.task == task]
        where = str(path)
    else:
        examples = load_task(task, "train", config.data_dir)
        where = f"the {task} train split"
    if not examples:
        raise DataError(f"train-gate: no prompts of task {task!r} in {where}")
    return [completion_prompt(student_prompt(e)) for e in examples]


def routing_split(tasks: list[str], config: GateTrainConfig) -> RoutingSplit:
    """De-duplicated, capped, per-task split prompts; label = the task's position in ``tasks``."""
    split = RoutingSplit([], [], [], [], {})
    for label, task in enumerate(tasks):
        prompts = task_prompts(task, config)
        unique = list(dict.fromkeys(prompts))
        used = subsample(unique, config.max_per_task, config.seed) if config.max_per_task else unique
        if len(used) < 2:
            raise DataError(f"train-gate: task {task!r} has {len(used)} distinct prompt(s); need >= 2 to hold one out")
        train, val = train_val_split(used, config.val_fraction, config.seed)
        split.train_prompts += train
        split.train_labels += [label] * len(train)
        split.val_prompts += val
        split.val_labels += [label] * len(val)
        split.counts[task] = {"file": len(prompts), "unique": len(unique), "used": len(used),
                              "train": len(train), "val": len(val)}
    return split


def featurise(featuriser, prompts: list[str]) -> torch.Tensor:
    """Features [N, D] of the prompts, computed in chunks of FEATURE_CHUNK."""
    chunks = [featuriser(prompts[i:i + FEATURE_CHUNK]) for i in range(0, len(prompts), FEATURE_CHUNK)]
    return torch.cat(chunks)  # [N, D]


def fit_gate(gate: Gate, features: torch.Tensor, labels: torch.Tensor, config: GateTrainConfig) -> list[float]:
    """Train ``gate`` in place on features [N, D] and labels [N]; returns the loss every 10 steps."""
    n_experts = len(gate.config.experts)
    counts = torch.bincount(labels, minlength=n_experts).float()  # [E]
    weight = counts.sum() / (n_experts * counts.clamp(min=1)) if config.class_balanced else None  # [E]
    optimizer = torch.optim.AdamW(gate.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    curve = []
    gate.train()
    for step in range(config.steps):
        batch = torch.randint(0, len(labels), (config.batch_size,), generator=generator)  # [B]
        loss = torch.nn.functional.cross_entropy(gate(features[batch]), labels[batch], weight=weight)  # []
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == config.steps - 1:
            curve.append(round(loss.item(), 6))
    gate.eval()
    return curve


@torch.no_grad()
def routing_metrics(gate: Gate, features: torch.Tensor, labels: torch.Tensor, tasks: list[str]) -> dict:
    """Top-1 accuracy, class-balanced accuracy, per-task accuracy and confusion matrix of a gate."""
    predicted = gate(features).argmax(dim=1)  # [N]
    n = len(tasks)
    confusion = torch.bincount(labels * n + predicted, minlength=n * n).reshape(n, n)  # [E, E] true x routed
    per_task = {t: (confusion[i, i] / confusion[i].sum()).item() for i, t in enumerate(tasks) if confusion[i].sum()}
    return {
        "accuracy": (predicted == labels).float().mean().item(),
        "balanced_accuracy": sum(per_task.values()) / len(per_task),
        "per_task": per_task,
        "confusion": {"rows": "true task", "columns": "routed task", "labels": tasks, "matrix": confusion.tolist()},
        "n": len(labels),
    }


@dataclass
class GateTrainResult:
    """What train_gate produced."""

    gate: Gate
    """The trained gate (also saved into the bundle)."""
    report: dict
    """The JSON report (also in the manifest and in `report_path`)."""
    report_path: Path
    """Where the report was written."""


def train_gate(config: GateTrainConfig) -> GateTrainResult:
    """Featurise, split, train, measure, and save the gate into ``config.bundle``."""
    config.validate()
    started = time.perf_counter()
    student = resolve_student(config.student)
    experts = expert_tasks(config.bundle, config.experts, student)
    names, tasks = list(experts), list(experts.values())
    split = routing_split(tasks, config)
    featuriser = make_featuriser(config.featuriser, student)
    train_x, val_x = featurise(featuriser, split.train_prompts), featurise(featuriser, split.val_prompts)  # [N, D]
    train_y, val_y = torch.tensor(split.train_labels), torch.tensor(split.val_labels)  # [N]
    featurised = time.perf_counter()

    torch.manual_seed(config.seed)
    gate = Gate(GateConfig(experts=names, feature_dim=featuriser.feature_dim, hidden_dim=config.hidden_dim,
                           temperature=config.temperature, top_k=min(config.top_k, len(names)),
                           grid=config.grid, featuriser=config.featuriser))
    curve = fit_gate(gate, train_x, train_y, config)
    validation = routing_metrics(gate, val_x, val_y, tasks)
    training = routing_metrics(gate, train_x, train_y, tasks)
    report = {
        "routing_accuracy": validation["accuracy"],
        "balanced_routing_accuracy": validation["balanced_accuracy"],
        "train_routing_accuracy": training["accuracy"],
        "validation": validation,
        "experts": experts,
        "prompts": split.counts,
        "loss_curve_every_10_steps": curve,
        "student": student_identity(student),
        "config": asdict(config),
        "featurise_seconds": round(featurised - started, 3),
        "train_seconds": round(time.perf_counter() - featurised, 3),
    }
    set_gate(config.bundle, gate, report)
    report_path = Path(config.report) if config.report else Path(config.bundle) / "reports" / "gate.json"
    write_json_atomic(report_path, report)
    return GateTrainResult(gate, report, report_path)


def main(argv: list[str] | None = None) -> int:
    config = parse_settings(GateTrainConfig, argv, "mode-cotd train-gate",
                            "Train the gate on the prompts of the bundle's experts' tasks and save it into the bundle.")
    result = train_gate(config)
    summary = {k: result.report[k] for k in ("routing_accuracy", "balanced_routing_accuracy", "train_routing_accuracy")}
    print(json.dumps({"report": str(result.report_path), **summary,
                      "per_task": result.report["validation"]["per_task"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
