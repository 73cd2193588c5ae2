"""Few-shot composition (LoraHub-style): one weight per expert for a new task, from k examples.

    minimise  L(w) + l1 · mean_i |w_i|   over w ∈ [lower, upper]^n   (nevergrad, `budget` evaluations)

L(w) is the objective (training/objectives.py) of the k shots with the experts mixed by the weights w:
by default the paper's, the student's mean cross-entropy over the target tokens (prompt tokens masked,
mode_cotd.format); or the loss on the answer tokens only, or the error rate of greedy generations on the
shots. The experts are mixed:

- exact: ΔW = Σ w_i·s_i·B_i·A_i, one LoRA of rank R = Σ r_i (mixing.compose_exact);
- linear: the paper's A' = Σ w_i·A_i, B' = Σ w_i·B_i (mixing.merge_linear, experts share r).

Each evaluation is cheap: the student is loaded once with one peft adapter of the mixture's
shape, and each candidate only overwrites its LoRA tensors in place. For exact mixing, A =
cat(A_i) never changes and B = cat(w_i·s_i·B_i) is the fixed cat(s_i·B_i) with each expert's
block of columns scaled by its w_i; for linear mixing A' and B' are both rewritten.

In a bundle with a shared adapter (`manifest.shared`) the search runs over the other experts with the
shared adapter merged into the student, as every route of such a bundle is served on top of it; the
recorded weights leave it out.

Shots: the task's 5-shot file learn/<task>.jsonl by default. A task without one
(coin_flip) uses FALLBACK_SHOTS examples of its train file drawn with FALLBACK_SEED, the same
five every run. The search starts from uniform weights 1/n; the report compares the loss of
uniform weights with the loss of the best weights found (the lowest objective seen, uniform
included, so the result is never worse than uniform on the objective).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mode_cotd.adapter import LoraAdapter, save_adapter
from mode_cotd.atomic import write_json_atomic
from mode_cotd.bundle import add_composition, load_bundle
from mode_cotd.data import load_examples, load_task, split_path, subsample
from mode_cotd.errors import ConfigError, DataError
from mode_cotd.mixing import compose_exact, merge_linear
from mode_cotd.mixture import check_name
from mode_cotd.settings import parse_settings
from mode_cotd.student import load_student, resolve_student, student_identity
from mode_cotd.tasks import get_task
from mode_cotd.weight_search import SearchSpace, WeightSearch, penalised
from training.distill import merge_shared_adapter
from training.objectives import OBJECTIVES, make_objective

FALLBACK_SHOTS = 5
"""Shots drawn from the train file of a task that has no learn file."""
FALLBACK_SEED = 0
"""Seed of that draw (fixed: the shots are part of the task's definition, not of a run)."""
MODES = ("exact", "linear")


@dataclass
class ComposeConfig:
    """Settings of `mode-cotd compose`."""

    task: str
    """Task to compose for (usually an unseen one)."""
    bundle: str = "bundle"
    """Bundle root holding the experts; the composition is recorded in it."""
    student: str | None = None
    """Student: a local HF folder, or None for the default student."""
    name: str | None = None
    """Composition name (served as mode-cotd:<name>); None: the task's name."""
    experts: list[str] | None = None
    """Experts to weigh; None: every expert in the bundle."""
    shots_file: str | None = None
    """File of the k examples (JSON list or JSONL); None: learn/<task>.jsonl, or 5 fixed train examples."""
    data_dir: str | None = None
    """Shared data folder; None: $MODE_COTD_DATA or ../shared/data/mode-cotd."""
    mode: str = "exact"
    """"exact" (compose_exact, rank Σr_i) or "linear" (the paper's merge of A and B, shared rank)."""
    optimizer: str = "NGOpt"
    """nevergrad optimizer name (ng.optimizers.registry)."""
    budget: int = 40
    """Loss evaluations the search may spend (besides the one of uniform weights)."""
    lower: float = -3.0
    """Lower bound of every weight."""
    upper: float = 3.0
    """Upper bound of every weight."""
    l1: float = 0.05
    """L1 penalty: objective = loss + l1 · mean_i |w_i|."""
    objective: str | None = None
    """What the search minimises (training/objectives.py): "few_shot_loss" (the paper's, every target token),
    "answer_loss" (the answer tokens only; it predicted accuracy best, docs/results.md) or "shot_error" (1 - greedy
    accuracy on the shots). None: the paper's few-shot loss offline; with --server, the server's runtime.objective."""
    max_length: int = 512
    """Most tokens per shot (prompt kept whole, target cut)."""
    batch_size: int = 5
    """Shots per forward pass."""
    dtype: str = "float32"
    """Student dtype: "float32" or "bfloat16"."""
    device: str = "auto"
    """"cpu", "cuda", or "auto" (CUDA when available)."""
    seed: int = 0
    """Seed of the search."""
    report: str | None = None
    """Where the JSON report goes; None: <bundle>/reports/compose_<name>.json."""
    server: str | None = None
    """A serving mode-cotd (http://host:port) to run the search instead, through its /v1/compositions (runtime
    routes on): the route is served at once, no restart (training/remote_compose.py). Offline when None."""

    def validate(self) -> None:
        """ConfigError naming the first invalid field."""
        get_task(self.task)
        check_name(self.name or self.task, "compose: name")
        checks = {
            "mode": self.mode in MODES, "budget": self.budget >= 1, "upper": self.lower < self.upper,
            "l1": self.l1 >= 0, "max_length": self.max_length >= 2, "batch_size": self.batch_size >= 1,
            "dtype": self.dtype in ("float32", "bfloat16"), "device": self.device in ("auto", "cpu", "cuda"),
            "objective": self.objective is None or self.objective in OBJECTIVES,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"compose: {name}: invalid value {getattr(self, name)!r}")


# ----------------------------------------------------------------------------- shots and loss


def load_shots(config: ComposeConfig):
    """(examples, where they came from): the shots file, learn/<task>.jsonl, or 5 fixed train examples."""
    if config.shots_file:
        path = Path(config.shots_file)
        examples = [e for e in load_examples(path, None if path.suffix == ".jsonl" else config.task)
                    if e.task == config.task]
        source = str(path)
    elif split_path(config.task, "learn", config.data_dir).exists():
        examples, source = load_task(config.task, "learn", config.data_dir), str(
            split_path(config.task, "learn", config.data_dir))
    else:
        train = load_task(config.task, "train", config.data_dir)
        examples = subsample(train, FALLBACK_SHOTS, FALLBACK_SEED)
        source = f"{split_path(config.task, 'train', config.data_dir)} ({FALLBACK_SHOTS} drawn with seed {FALLBACK_SEED})"
    shots = [e for e in examples if e.rationale is not None]
    if not shots:
        raise DataError(f"compose: {source} has no examples of task {config.task!r} with a rationale target")
    return shots, source


# ----------------------------------------------------------------------------- mixing in place


class ExactMixer:
    """Candidates under exact mixing: A = cat(A_i) fixed, B = cat(w_i·s_i·B_i) (mixing.compose_exact)."""

    def __init__(self, adapters: Sequence[LoraAdapter]):
        self.unit = compose_exact(adapters, [1.0] * len(adapters))  # B blocks = s_i·B_i
        self.ranks = torch.tensor([a.r for a in adapters])  # [n]

    def initial(self) -> LoraAdapter:
        """The adapter the student is loaded with (its shape; weights are overwritten)."""
        return self.unit

    def tensors(self, weights: Sequence[float]) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
        """Module path -> (None: A unchanged, B [out, R]) for the weights."""
        columns = torch.repeat_interleave(torch.tensor(weights, dtype=torch.float32), self.ranks)  # [R]
        return {path: (None, b * columns) for path, (_, b) in self.unit.modules().items()}  # B [out, R]


class LinearMixer:
    """Candidates under the paper's linear merge: A' = Σ w_i·A_i, B' = Σ w_i·B_i (mixing.merge_linear)."""

    def __init__(self, adapters: Sequence[LoraAdapter]):
        self.adapters, self.merge = list(adapters), merge_linear
        self.start = merge_linear(self.adapters, [1.0 / len(adapters)] * len(adapters))

    def initial(self) -> LoraAdapter:
        return self.start

    def tensors(self, weights: Sequence[float]) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
        """Module path -> (A' [r, in], B' [out, r]) for the weights."""
        return self.merge(self.adapters, list(weights)).modules()


def write_lora(peft_model, tensors: dict[str, tuple[torch.Tensor | None, torch.Tensor]], adapter: str = "default"):
    """Overwrite, in place, the LoRA A (when given) and B of each module path of a PeftModel."""
    with torch.no_grad():
        for path, (a, b) in tensors.items():
            module = peft_model.get_submodule(path)
            if a is not None:
                module.lora_A[adapter].weight.copy_(a)
            module.lora_B[adapter].weight.copy_(b)


def mixed_student(student: Path, initial: LoraAdapter, dtype: str, device: str, shared: Path | None = None):
    """(PeftModel, tokenizer): the frozen student with one adapter of ``initial``'s shape, in eval mode; with
    ``shared`` (a LoRA folder) merged into the student's weights first, as a bundle's shared adapter is served
    under every route (training.distill.merge_shared_adapter)."""
    from peft import PeftModel

    model, tokenizer = load_student(student, dtype=dtype, device=device)
    if shared is not None:
        merge_shared_adapter(model, shared)
    with tempfile.TemporaryDirectory(prefix="mode-cotd-compose-") as tmp:
        save_adapter(initial, Path(tmp) / "adapter")
        peft_model = PeftModel.from_pretrained(model, str(Path(tmp) / "adapter"), is_trainable=False)
    return peft_model.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------- search


def search_weights(loss, n: int, config: ComposeConfig) -> list[dict]:
    """Run the search (mode_cotd.weight_search) on ``loss(weights) -> float``; returns every evaluation, in order."""
    search = WeightSearch(SearchSpace(n=n, lower=config.lower, upper=config.upper, budget=config.budget,
                                      optimizer=config.optimizer, seed=config.seed, l1=config.l1))
    while not search.done:
        weights = search.ask()
        search.tell(weights, loss(weights))
    return search.history


@dataclass
class ComposeResult:
    """What compose() produced."""

    weights: dict[str, float]
    """Expert -> weight of the best candidate."""
    report: dict
    """The JSON report (also in the manifest and at `report_path`)."""
    report_path: Path
    """Where the report was written."""


def compose(config: ComposeConfig) -> ComposeResult:
    """Search the expert weights for ``config.task`` and record them as a composition in the bundle."""
    config.validate()
    started = time.perf_counter()
    name = config.name or config.task
    student = resolve_student(config.student)
    bundle = load_bundle(config.bundle, student=student, strict=True)
    shared = bundle.shared  # under every route, at weight 1: merged into the student, never weighed
    experts = [e for e in bundle.experts if e != shared] if config.experts is None else list(config.experts)
    unknown = sorted(set(experts) - set(bundle.experts))
    if unknown or not experts:
        raise ConfigError(f"compose: experts {unknown or experts} not usable; the bundle has {sorted(bundle.experts)}")
    if shared in experts:
        raise ConfigError(f"compose: {shared!r} is the bundle's shared adapter, under every route at weight 1; "
                          "it cannot be weighed")
    adapters = [bundle.experts[e].load() for e in experts]
    if config.mode == "linear" and len({a.r for a in adapters}) != 1:
        raise ConfigError(f"compose: linear mixing needs experts of one rank, got {[a.r for a in adapters]}")
    shots, source = load_shots(config)

    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    mixer = ExactMixer(adapters) if config.mode == "exact" else LinearMixer(adapters)
    peft_model, tokenizer = mixed_student(student, mixer.initial(), config.dtype, device,
                                          bundle.experts[shared].path if shared is not None else None)
    objective_name = config.objective or "few_shot_loss"
    measure = make_objective(objective_name, peft_model, tokenizer, shots, config.max_length, config.batch_size,
                             device)

    def loss(weights: list[float]) -> float:
        write_lora(peft_model, mixer.tensors(weights))
        return measure()

    uniform_weights = [1.0 / len(experts)] * len(experts)
    uniform_loss = loss(uniform_weights)
    uniform_objective = penalised(uniform_loss, uniform_weights, config.l1)
    history = search_weights(loss, len(experts), config)
    best = min([{"weights": uniform_weights, "loss": uniform_loss, "objective": uniform_objective}, *history],
               key=lambda h: h["objective"])
    weights = dict(zip(experts, best["weights"]))

    digest = hashlib.sha256(json.dumps([[e.input, e.output] for e in shots]).encode()).hexdigest()
    report = {
        "task": config.task, "name": name, "mode": config.mode, "experts": experts, "shared": shared,
        "objective": objective_name,
        "shots": {"source": source, "n": len(shots), "scored": measure.tokens, "sha256": digest},
        "uniform": {"weights": dict(zip(experts, uniform_weights)), "loss": uniform_loss,
                    "objective": uniform_objective},
        "found": {"weights": weights, "loss": best["loss"], "objective": best["objective"]},
        "loss_reduction": uniform_loss - best["loss"],
        "history": [{"loss": h["loss"], "objective": h["objective"]} for h in history],
        "student": student_identity(student), "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 3),
    }
    add_composition(config.bundle, name, weights, config.mode, config.task, report)
    report_path = Path(config.report) if config.report else Path(config.bundle) / "reports" / f"compose_{name}.json"
    write_json_atomic(report_path, report)
    return ComposeResult(weights, report, report_path)


def main(argv: list[str] | None = None) -> int:
    config = parse_settings(ComposeConfig, argv, "mode-cotd compose",
                            "Search one weight per expert for a task from its few shots (LoraHub-style) "
                            "and record the composition in the bundle.")
    if config.server:
        from training.remote_compose import compose_on_server

        config.validate()
        shots, _ = load_shots(config)
        print(json.dumps(compose_on_server(config, shots), indent=2))
        return 0
    result = compose(config)
    report = result.report
    print(json.dumps({"report": str(result.report_path), "name": report["name"], "mode": report["mode"],
                      "uniform_loss": report["uniform"]["loss"], "found_loss": report["found"]["loss"],
                      "weights": result.weights}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
