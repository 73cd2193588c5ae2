"""Gate fine-tuning end to end, through the language-model loss of the mixed experts (the stretch goal).

The classification stage (training.gate) teaches the gate which task a prompt belongs to.
This stage then tunes it for what it is for: the mixture that lowers the student's loss on
the target. Per example b the gate gives weights over the experts,

    w_b = softmax over the top-k logits of gate(features_b) / T   (the others get 0)   [B, E]

and the student runs with the exact mixture Σ_i w_bi·s_i·B_i·A_i in every adapted module.
That is one LoRA of rank R = Σ r_i with A = cat(A_i) and B = cat(s_i·B_i) (compose_exact with
unit weights), where example b's rank activations A·x [B, T, R] are scaled, column block i
by w_bi, through a forward hook on each lora_A: per-example mixtures in one batch, and a
loss that is differentiable in w, hence in the gate. The student and the experts stay
frozen; only the gate learns (AdamW). The loss covers the target tokens only.

Serving rounds the weights to the grid; training uses them unrounded (the rounding has no
gradient). The report compares the held-out LM loss and the routing accuracy before and
after. The gate is saved into the bundle; its report keeps the classification stage's under
"classification", puts this stage's under "end_to_end", and measures `routing_accuracy` of
the tuned gate again on the classification stage's held-out prompts.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass

import torch

from mode_cotd.bundle import load_bundle, read_manifest, set_gate
from mode_cotd.data import load_task, student_prompt, subsample
from mode_cotd.errors import ConfigError
from mode_cotd.featurise import make_featuriser
from mode_cotd.format import completion_prompt, completion_target, pad_id, tokenize_example
from mode_cotd.mixing import compose_exact
from mode_cotd.settings import parse_settings
from mode_cotd.student import resolve_student
from training.compose import mixed_student
from training.distill import collate
from training.gate import GateTrainConfig, featurise, routing_metrics, routing_split


@dataclass
class GateE2EConfig:
    """Settings of the end-to-end gate fine-tuning."""

    bundle: str = "bundle"
    """Bundle root with experts and a gate (the starting point); the tuned gate replaces it."""
    student: str | None = None
    """Student: a local HF folder, or None for the default student."""
    data_dir: str | None = None
    """Shared data folder; None: $MODE_COTD_DATA or ../shared/data/mode-cotd."""
    per_task: int = 32
    """Train examples (rationale targets) per expert's task, seeded subsample."""
    val_per_task: int = 8
    """Held-out examples per task, disjoint from the train ones."""
    steps: int = 50
    """AdamW steps."""
    batch_size: int = 4
    """Examples per step."""
    lr: float = 1e-3
    """AdamW learning rate of the gate."""
    max_length: int = 512
    """Most tokens per example (prompt kept whole, target cut)."""
    dtype: str = "float32"
    """Student dtype: "float32" or "bfloat16"."""
    device: str = "auto"
    """"cpu", "cuda", or "auto" (CUDA when available)."""
    seed: int = 0
    """Seed of the subsample, the split and the batch order."""

    def validate(self) -> None:
        checks = {"per_task": self.per_task >= 1, "val_per_task": self.val_per_task >= 1, "steps": self.steps >= 1,
                  "batch_size": self.batch_size >= 1, "lr": self.lr > 0, "max_length": self.max_length >= 2,
                  "dtype": self.dtype in ("float32", "bfloat16"), "device": self.device in ("auto", "cpu", "cuda")}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"gate e2e: {name}: invalid value {getattr(self, name)!r}")


class MixtureScaler:
    """Forward hooks that scale each lora_A output's rank columns by per-example expert weights."""

    def __init__(self, peft_model, module_paths, ranks: list[int], adapter: str = "default"):
        self.ranks = torch.tensor(ranks)  # [E]
        self.columns: torch.Tensor | None = None  # [B, 1, R]
        self.handles = [peft_model.get_submodule(p).lora_A[adapter].register_forward_hook(self._scale)
                        for p in module_paths]

    def set_weights(self, weights: torch.Tensor) -> None:
        """weights [B, E] -> the column scales [B, 1, R] used by the next forward pass."""
        self.columns = torch.repeat_interleave(weights, self.ranks.to(weights.device), dim=1)[:, None, :]  # [B, 1, R]

    def _scale(self, module, inputs, output):
        return output * self.columns.to(output.dtype)  # [B, T, R]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def top_k_weights(logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """softmax(logits / T) over each row's k largest logits, 0 elsewhere: [B, E] -> [B, E]."""
    kth = logits.topk(k, dim=1).values[:, -1:]  # [B, 1]
    masked = logits.masked_fill(logits < kth, float("-inf"))  # [B, E]
    return torch.softmax(masked / temperature, dim=1)  # [B, E]


def _examples(tasks: dict[str, str], config: GateE2EConfig):
    """(train, val) lists of (example, expert index), disjoint, per task."""
    train, val = [], []
    for index, task in enumerate(tasks.values()):
        examples = [e for e in load_task(task, "train", config.data_dir) if e.rationale is not None]
        drawn = subsample(examples, config.per_task + config.val_per_task, config.seed)
        if len(drawn) < 2:
            raise ConfigError(f"gate e2e: task {task!r} has {len(drawn)} usable example(s); need >= 2")
        cut = max(1, min(config.val_per_task, len(drawn) - 1))
        val += [(e, index) for e in drawn[:cut]]
        train += [(e, index) for e in drawn[cut:]]
    return train, val


def held_out_routing(gate, previous: dict, tasks: list[str], featuriser) -> dict | None:
    """routing_metrics of ``gate`` on the held-out prompts of the classification stage (None without its config)."""
    if "config" not in previous:
        return None
    split = routing_split(tasks, GateTrainConfig(**previous["config"]))
    return routing_metrics(gate, featurise(featuriser, split.val_prompts), torch.tensor(split.val_labels), tasks)


def finetune_gate(config: GateE2EConfig) -> dict:
    """Tune the bundle's gate through the LM loss of the mixed experts; returns (and saves) the report."""
    config.validate()
    started = time.perf_counter()
    student = resolve_student(config.student)
    bundle = load_bundle(config.bundle, student=student, strict=True)
    if bundle.gate is None:
        raise ConfigError(f"gate e2e: the bundle {config.bundle} has no gate to start from (run train-gate first)")
    gate, names = bundle.gate, bundle.gate.config.experts
    tasks = {name: bundle.experts[name].record.task for name in names}
    adapters = [bundle.experts[name].load() for name in names]
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    unit = compose_exact(adapters, [1.0] * len(adapters))  # A = cat(A_i), B = cat(s_i·B_i)
    model, tokenizer = mixed_student(student, unit, config.dtype, device)
    scaler = MixtureScaler(model, list(unit.modules()), [a.r for a in adapters])

    train, val = _examples(tasks, config)
    featuriser = make_featuriser(gate.config.featuriser, student)
    pad = pad_id(tokenizer)

    def encode(pairs):
        prompts = [completion_prompt(student_prompt(e)) for e, _ in pairs]
        features = featurise(featuriser, prompts).to(device)  # [N, D]
        tokens = [tokenize_example(tokenizer, p, completion_target(e.output), config.max_length)
                  for p, (e, _) in zip(prompts, pairs)]
        return features, tokens, torch.tensor([i for _, i in pairs])

    def lm_loss(features, tokens) -> torch.Tensor:
        scaler.set_weights(top_k_weights(gate(features), gate.config.top_k, gate.config.temperature))  # [B, E]
        input_ids, attention_mask, labels = (t.to(device) for t in collate(tokens, pad))  # [B, T] each
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss  # []

    def evaluate(features, tokens, labels) -> dict:
        gate.eval()
        with torch.no_grad():
            losses = [lm_loss(features[i:i + config.batch_size], tokens[i:i + config.batch_size]).item()
                      for i in range(0, len(tokens), config.batch_size)]
            routed = gate(features).argmax(1).cpu()  # [N]
        return {"lm_loss": sum(losses) / len(losses), "routing_accuracy": (routed == labels).float().mean().item()}

    train_x, train_tokens, _ = encode(train)
    val_x, val_tokens, val_y = encode(val)
    gate.to(device)
    before = evaluate(val_x, val_tokens, val_y)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    curve = []
    for _ in range(config.steps):
        gate.train()
        batch = torch.randperm(len(train_tokens), generator=generator)[: config.batch_size].tolist()
        loss = lm_loss(train_x[batch], [train_tokens[i] for i in batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(round(loss.item(), 6))
    after = evaluate(val_x, val_tokens, val_y)
    scaler.remove()

    gate.to("cpu").eval()
    previous = read_manifest(config.bundle).gate.report or {}
    routing = held_out_routing(gate, previous, list(tasks.values()), featuriser)
    report = {"routing_accuracy": routing["accuracy"] if routing else None,
              "balanced_routing_accuracy": routing["balanced_accuracy"] if routing else None,
              "validation": routing, "classification": previous,
              "end_to_end": {"before": before, "after": after, "loss_curve": curve, "experts": tasks,
                             "train_examples": len(train), "val_examples": len(val), "config": asdict(config),
                             "seconds": round(time.perf_counter() - started, 3)}}
    set_gate(config.bundle, gate, report)
    return report


def main(argv: list[str] | None = None) -> int:
    config = parse_settings(GateE2EConfig, argv, "python -m training.gate_e2e",
                            "Fine-tune the bundle's gate end to end through the LM loss of the mixed experts.")
    report = finetune_gate(config)
    print(json.dumps({k: report["end_to_end"][k] for k in ("before", "after", "seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
