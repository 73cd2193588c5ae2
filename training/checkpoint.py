"""Resumable training state, saved without pickle.

A checkpoint is a folder ``<work_dir>/step-<NNNNNNNN>/`` written atomically (temporary
folder, fsync, rename), so a kill at any moment leaves only complete checkpoints:

    trainable.safetensors   the trainable parameters by name (the LoRA A and B weights)
    optimizer.safetensors   the optimizer's per-parameter state tensors, ``<index>.<key>``
    optimizer.json          its param_groups (lr, betas, eps, weight decay...)
    rng.safetensors         torch's CPU RNG state (uint8) and each CUDA device's
    state.json              step, loss curve, token and time counters, the run's fingerprint

Nothing here is read with torch.load or pickle. After a new checkpoint is written the older
ones are removed; leftovers of a write cut short (dot-prefixed temporary folders) are
removed before the next write.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mode_cotd.atomic import atomic_dir
from mode_cotd.errors import ConfigError, DataError

_STEP_DIR = re.compile(r"step-(\d{8})")
STATE = "state.json"


@dataclass
class TrainingState:
    """The scalars of a run at a step; with the tensors this is all a resume needs."""

    step: int
    """Optimizer steps done."""
    fingerprint: str
    """sha256 of what determines the result (config, data, student); a resume must match it."""
    loss_curve: list[float] = field(default_factory=list)
    """Training loss of each step done, in order."""
    tokens: int = 0
    """Tokens (prompt + target, no padding) processed so far."""
    train_seconds: float = 0.0
    """Wall time spent in training steps so far, over all resumed runs."""


def checkpoint_dirs(work_dir: str | Path) -> list[Path]:
    """The complete checkpoints in ``work_dir``, oldest first."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    found = [p for p in work_dir.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The checkpoint with the most steps, or None."""
    found = checkpoint_dirs(work_dir)
    return found[-1] if found else None


def remove_checkpoints(work_dir: str | Path) -> None:
    """Delete every checkpoint (and leftover temporary folder) in ``work_dir``; other files stay."""
    for path in checkpoint_dirs(work_dir) + sorted(Path(work_dir).glob(".step-*")):
        shutil.rmtree(path, ignore_errors=True)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {index}.{key} is not a tensor: {type(value).__name__}")
            tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
    return tensors, state_dict["param_groups"]


def _rng_tensors() -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}  # uint8 [N]
    if torch.cuda.is_available():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{device}"] = state
    return rng


def save_checkpoint(work_dir: str | Path, state: TrainingState, trainable: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, keep: int = 1) -> Path:
    """Write ``<work_dir>/step-<state.step>/`` atomically; keep only the newest ``keep`` checkpoints."""
    from safetensors.torch import save_file

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in work_dir.glob(".step-*"):  # a write cut short by a kill
        shutil.rmtree(stale, ignore_errors=True)
    optimizer_tensors, param_groups = _optimizer_tensors(optimizer)
    target = work_dir / f"step-{state.step:08d}"
    with atomic_dir(target) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        save_file(optimizer_tensors, tmp / "optimizer.safetensors")
        save_file(_rng_tensors(), tmp / "rng.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(param_groups, indent=1))
        (tmp / STATE).write_text(json.dumps(asdict(state), indent=1, allow_nan=False))
    for old in checkpoint_dirs(work_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_state(path: str | Path) -> TrainingState:
    """The TrainingState of a checkpoint folder; DataError names a missing or bad state.json."""
    file = Path(path) / STATE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return TrainingState(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{file}: unreadable checkpoint state ({exc})") from None


def load_checkpoint(path: str | Path, parameters: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, fingerprint: str) -> TrainingState:
    """Restore parameters, optimizer and RNG states from a checkpoint folder; return its scalars.

    ConfigError when the checkpoint belongs to another run (its fingerprint differs) or
    its parameter names differ from ``parameters``.
    """
    from safetensors.torch import load_file

    path = Path(path)
    state = read_state(path)
    if state.fingerprint != fingerprint:
        raise ConfigError(
            f"{path}: checkpoint of another run (fingerprint {state.fingerprint[:12]}, this run {fingerprint[:12]}): "
            "the config, data or student differ; use another work_dir or resume=False"
        )
    saved = load_file(path / "trainable.safetensors")
    if set(saved) != set(parameters):
        raise ConfigError(f"{path}: checkpoint parameters do not match the model's trainable parameters")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(saved[name])
    tensors = load_file(path / "optimizer.safetensors")
    groups = json.loads((path / "optimizer.json").read_text())
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    for key, value in rng.items():
        if key.startswith("cuda.") and torch.cuda.is_available():
            torch.cuda.set_rng_state(value, int(key.split(".")[1]))
    return state
