"""DistillConfig: every setting of an expert distillation, and the `mode-cotd distill` parser built from it.

The command line has one ``--flag`` per field (help = the field's docstring), and
``--config FILE`` (JSON, YAML or TOML) for a dict of fields; flags override the file
(mode_cotd/settings.py, as every other command).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mode_cotd.errors import ConfigError
from mode_cotd.settings import parse_settings, settings_from_dict, settings_parser
from mode_cotd.tasks import get_task

DTYPES = ("auto", "float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("linear", "constant")
PROG = "mode-cotd distill"
DESCRIPTION = "Distil one LoRA expert for a task and write it into a bundle."


@dataclass
class DistillConfig:
    """One expert's distillation."""

    task: str
    """Task to distil (a key of mode_cotd.tasks.TASKS); with `tasks` set, a free label such as "all_data"."""
    tasks: list[str] | None = None
    """Train one multi-task expert on the union of these tasks' train files, each subsampled to
    `subsample` (the paper's `all_data` baseline); None: the single task `task`."""
    student: str | None = None
    """Student: a local HF folder, or None for the default student (SmolLM2-135M-Instruct)."""
    train_file: str | None = None
    """Rationale file (JSON list or JSONL, e.g. a teacher's rationales.jsonl); None: the task's shared train file."""
    data_dir: str | None = None
    """Shared data folder for the default train file; None: $MODE_COTD_DATA or ../shared/data/mode-cotd."""
    subsample: int | None = None
    """Train on this many examples, drawn with `seed`; None: all."""
    r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32
    """LoRA alpha (scaling alpha / r)."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA input during training."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Short names of the linear layers to adapt, or "all-linear" (every linear layer but the output head)."""
    lr: float = 5e-4
    """Peak learning rate (AdamW)."""
    schedule: str = "linear"
    """"linear": warmup then linear decay to 0 at the last step; "constant": warmup then constant."""
    warmup_steps: int = 0
    """Steps of linear warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this; 0 disables clipping."""
    epochs: int = 5
    """Passes over the data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (each micro-batch's mean loss weighs 1/grad_accum)."""
    max_length: int = 512
    """Most tokens per example (prompt kept whole, target cut; see mode_cotd.format.tokenize_example)."""
    seed: int = 0
    """Seed of the LoRA init, the data order, dropout and subsampling."""
    dtype: str = "auto"
    """Student weights dtype: "float32", "bfloat16", or "auto" (bfloat16 on CUDA, float32 on CPU)."""
    device: str = "auto"
    """"cpu", "cuda", or "auto" (CUDA when available)."""
    autocast: str = "no"
    """Mixed precision: "bfloat16" runs the forward pass under torch.autocast in bf16 (weights, LoRA parameters
    and the optimizer stay in `dtype`); "no": off. On a CPU with AVX512-BF16 a 135M student's step (r16, batch
    16 x 256 tokens) took 11-12 s against 20 s in float32."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many steps (and at the last step)."""
    work_dir: str | None = None
    """Checkpoint folder; None: <cache>/distill/<expert>-<fingerprint>, so an identical rerun resumes."""
    bundle: str = "bundle"
    """Bundle root the expert is written into (created for this student when missing)."""
    expert: str | None = None
    """Expert name in the bundle; None: the task's name."""
    resume: bool = True
    """Resume from the newest checkpoint in work_dir when there is one; False deletes them and starts over."""
    stop_after_steps: int | None = None
    """Stop after this many steps, checkpointed, without writing the expert (time-boxed runs, tests)."""
    progress: bool = True
    """Show a progress bar with the loss and tokens/s."""
    save_dtype: str = "bfloat16"
    """Dtype of the expert's weights in the bundle ("float32" or "bfloat16"; bf16 halves the bundle)."""
    shared_adapter: str | None = None
    """A LoRA folder (e.g. bundles/all_data/experts/all_data) merged into the student and frozen before
    training, so the expert learns a residual over it and is served on top of it; None: over the bare student."""

    NOT_IN_FINGERPRINT: ClassVar[frozenset] = frozenset(
        {"checkpoint_every", "work_dir", "bundle", "expert", "resume", "stop_after_steps", "progress", "student", "save_dtype",
         "data_dir", "train_file", "device", "dtype", "shared_adapter"})
    """Fields that do not change the trained weights (the student, data, device, dtype and shared adapter
    enter the fingerprint through their resolved identity, data hash, resolved names and file checksums)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "distill config") -> DistillConfig:
        """A config from a dict; ConfigError names unknown keys, missing ones and values of the wrong type."""
        return settings_from_dict(cls, data, source)

    def validate(self) -> None:
        """ConfigError naming the first field with an invalid value."""
        if self.tasks:
            for task in self.tasks:
                get_task(task)
        else:
            get_task(self.task)
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                self.target_modules = [m for m in self.target_modules.split(",") if m]
        elif list(self.target_modules) == ["all-linear"]:
            self.target_modules = "all-linear"
        if not self.target_modules:
            raise ConfigError("target_modules: empty")
        checks = {
            "r": self.r >= 1, "lora_alpha": self.lora_alpha > 0, "lora_dropout": 0 <= self.lora_dropout < 1,
            "lr": self.lr > 0, "warmup_steps": self.warmup_steps >= 0, "weight_decay": self.weight_decay >= 0,
            "max_grad_norm": self.max_grad_norm >= 0, "epochs": self.epochs >= 1,
            "max_steps": self.max_steps is None or self.max_steps >= 1, "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1, "max_length": self.max_length >= 2,
            "checkpoint_every": self.checkpoint_every >= 1,
            "subsample": self.subsample is None or self.subsample >= 1,
            "stop_after_steps": self.stop_after_steps is None or self.stop_after_steps >= 1,
            "dtype": self.dtype in DTYPES, "save_dtype": self.save_dtype in ("float32", "bfloat16"),
            "autocast": self.autocast in ("no", "bfloat16"), "device": self.device in DEVICES,
            "schedule": self.schedule in SCHEDULES,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"{name}: invalid value {getattr(self, name)!r}")


def build_parser() -> argparse.ArgumentParser:
    """`mode-cotd distill`: one flag per DistillConfig field, plus --config."""
    return settings_parser(DistillConfig, PROG, DESCRIPTION)


def parse_args(argv: list[str] | None) -> DistillConfig:
    """A DistillConfig from command-line arguments (flags override --config FILE)."""
    return parse_settings(DistillConfig, argv, PROG, DESCRIPTION)
