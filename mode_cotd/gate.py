"""The gate: prompt features -> a mixture of experts, on a grid so that equal mixtures share one adapter.

    features [B, D] -> logits [B, E] -> softmax(logits / T) -> top-k -> renormalise -> round to grid

Rounding to the grid (grid = 1/n for an integer n) happens in integer units of 1/n by the
largest-remainder method (mode_cotd.mixture.round_to_grid): each renormalised weight w gets
floor(w·n) units, and the units still missing to reach n go, one each, to the largest
remainders (ties to the more probable expert). So the rounded weights are multiples of the
grid that sum to exactly 1, and experts that round to 0 units are dropped. The gate's output
is a mode_cotd.mixture.Mixture of those units: two prompts whose rounded mixtures are equal
get equal Mixtures.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mode_cotd.adapter import PICKLE_SUFFIXES
from mode_cotd.atomic import atomic_dir
from mode_cotd.errors import BundleError, ConfigError
from mode_cotd.featurise import FEATURISERS
from mode_cotd.mixture import Mixture, check_name, grid_units, round_to_grid

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "gate_config.json"

# ---------------------------------------------------------------------------- the gate


@dataclass
class GateConfig:
    """Shape and routing rule of a gate."""

    experts: list[str]
    """Expert names, in the order of the gate's output logits."""
    feature_dim: int
    """D, the width of the featuriser's output (the student's hidden size for embedding_mean)."""
    hidden_dim: int = 0
    """Width of one hidden layer (GELU); 0 makes the gate linear."""
    temperature: float = 1.0
    """Softmax temperature T: probabilities = softmax(logits / T)."""
    top_k: int = 2
    """Experts kept per prompt (the k most probable), then renormalised to sum 1."""
    grid: float = 0.05
    """Weights are rounded to multiples of this (1/n for an integer n), summing to exactly 1."""
    featuriser: str = "embedding_mean"
    """Name in mode_cotd.featurise.FEATURISERS of the featuriser that makes the gate's input."""
    normalise_features: bool = True
    """Apply a parameter-free LayerNorm to the features before the first linear layer."""
    abstain_below: float = 0.0
    """When the most probable expert's probability is below this, the gate abstains: the prompt goes to
    `abstain_to` alone, at weight 1 ("no expert fits"). 0: never abstains."""
    abstain_to: str | None = None
    """Where an abstention goes: the bundle's shared adapter (manifest.shared), never one of `experts`. Needed
    when abstain_below > 0."""

    def __post_init__(self) -> None:
        if not isinstance(self.experts, (list, tuple)) or not self.experts:
            raise ConfigError("gate config: 'experts' must be a non-empty list of names")
        self.experts = [check_name(e, "gate config: expert") for e in self.experts]
        if len(set(self.experts)) != len(self.experts):
            raise ConfigError(f"gate config: 'experts' names an expert twice: {self.experts}")
        for key, low in (("feature_dim", 1), ("hidden_dim", 0), ("top_k", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"gate config: {key!r} must be an integer >= {low}, got {value!r}")
        if self.top_k > len(self.experts):
            raise ConfigError(f"gate config: 'top_k' {self.top_k} exceeds the {len(self.experts)} experts")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"gate config: 'temperature' must be a finite number > 0, got {t!r}")
        grid_units(self.grid)
        if self.featuriser not in FEATURISERS:
            raise ConfigError(
                f"gate config: unknown featuriser {self.featuriser!r}; known: {sorted(FEATURISERS)}"
            )
        if not isinstance(self.normalise_features, bool):
            raise ConfigError("gate config: 'normalise_features' must be true or false")
        a = self.abstain_below
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            raise ConfigError(f"gate config: 'abstain_below' must be a number in [0, 1], got {a!r}")
        if self.abstain_to is not None:
            check_name(self.abstain_to, "gate config: 'abstain_to'")
            if self.abstain_to in self.experts:
                raise ConfigError(f"gate config: 'abstain_to' {self.abstain_to!r} is one of the routed experts")
        elif a > 0:
            raise ConfigError("gate config: 'abstain_below' > 0 needs 'abstain_to' (the shared adapter)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> GateConfig:
        """GateConfig from a dict; ConfigError for unknown or missing keys and invalid values."""
        if not isinstance(data, dict):
            raise ConfigError("gate config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"gate config: unknown keys {unknown}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"gate config: {e}") from e


class Gate(nn.Module):
    """features [B, D] -> expert logits [B, E]; `mixtures` turns them into Mixtures."""

    def __init__(self, config: GateConfig):
        super().__init__()
        self.config = config
        d, h, e = config.feature_dim, config.hidden_dim, len(config.experts)
        norm = [nn.LayerNorm(d, elementwise_affine=False)] if config.normalise_features else []
        layers = [nn.Linear(d, e)] if h == 0 else [nn.Linear(d, h), nn.GELU(), nn.Linear(h, e)]
        self.net = nn.Sequential(*norm, *layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.config.feature_dim:
            raise ConfigError(
                f"gate expects features [B, {self.config.feature_dim}], got {list(features.shape)}"
            )
        return self.net(features.float())  # [B, E]

    @torch.no_grad()
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """softmax(logits / T): [B, E], fp32."""
        return torch.softmax(self(features) / self.config.temperature, dim=-1)  # [B, E]

    @torch.no_grad()
    def mixtures(self, features: torch.Tensor) -> list[Mixture]:
        """One Mixture per row of features [B, D]: top-k, renormalised, rounded to the grid (units of 1/n); or
        `abstain_to` alone where the top probability is below `abstain_below`."""
        n = grid_units(self.config.grid)
        probs = self.probabilities(features).double()  # [B, E]
        abstain = (probs.max(1).values < self.config.abstain_below).tolist()  # [B]
        order = torch.sort(probs, dim=1, descending=True, stable=True).indices[
            :, : self.config.top_k
        ]  # [B, k]
        top = probs.gather(1, order)  # [B, k]
        units = round_to_grid(top / top.sum(1, keepdim=True), n)  # [B, k]
        names = self.config.experts
        return [
            Mixture.one(self.config.abstain_to) if skip
            else Mixture.from_units({names[i]: u for i, u in zip(row_idx, row_units)}, n)
            for row_idx, row_units, skip in zip(order.tolist(), units.tolist(), abstain)
        ]


# ---------------------------------------------------------------------------- save / load


def save_gate(gate: Gate, path: str | Path) -> Path:
    """Write gate.safetensors + gate_config.json into the folder `path`, atomically; return it."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in gate.state_dict().items()}
    data = save(tensors, metadata={"format": "pt"})
    target = Path(path)
    with atomic_dir(target) as tmp:
        (tmp / GATE_WEIGHTS).write_bytes(data)
        text = json.dumps(gate.config.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
        (tmp / GATE_CONFIG).write_text(text, encoding="utf-8")
    return target


def load_gate(path: str | Path) -> Gate:
    """Read a gate folder; BundleError naming the file for anything missing, unreadable or mis-shaped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise BundleError(f"{folder}: gate folder not found")
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() in PICKLE_SUFFIXES:
            raise BundleError(f"{f}: pickled weights are refused; the gate must be safetensors")
    config_path, weights_path = folder / GATE_CONFIG, folder / GATE_WEIGHTS
    for f in (config_path, weights_path):
        if not f.is_file():
            raise BundleError(f"{f}: missing gate file")
    try:
        config = GateConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ConfigError) as e:
        raise BundleError(f"{config_path}: {e}") from e
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{weights_path}: unreadable safetensors ({e})") from e
    gate = Gate(config)
    expected = {k: tuple(v.shape) for k, v in gate.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        raise BundleError(f"{weights_path}: tensors {found} do not fit {config_path} (expects {expected})")
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise BundleError(f"{weights_path}: non-finite gate weights")
    gate.load_state_dict({k: v.float() for k, v in tensors.items()})
    return gate.eval()
