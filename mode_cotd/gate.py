"""The gate: prompt features -> a mixture of experts, keyed so that equal mixtures share one adapter.

    features [B, D] -> logits [B, E] -> softmax(logits / T) -> top-k -> renormalise -> round to grid

Rounding to the grid (grid = 1/n for an integer n) happens in integer units of 1/n by the
largest-remainder method: each renormalised weight w gets floor(w·n) units, and the units
still missing to reach n go, one each, to the largest remainders (ties to the more
probable expert). So the rounded weights are multiples of the grid that sum to exactly 1,
and experts that round to 0 units are dropped. Two prompts whose rounded mixtures are
equal get equal MixtureKeys (weights are stored canonically as units / n).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mode_cotd.adapter import PICKLE_SUFFIXES
from mode_cotd.atomic import atomic_dir
from mode_cotd.errors import BundleError, ConfigError, ModeCotdError
from mode_cotd.featurise import FEATURISERS

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "gate_config.json"

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
"""Names of experts and compositions: also folder names in a bundle, and never hold ',' or '='."""


def check_name(name: Any, what: str, error: type[ModeCotdError] = ConfigError) -> str:
    """`name` when it is a safe name (NAME_PATTERN, no leading '.', no '..'); else raise `error`."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name.startswith(".") or ".." in name:
        raise error(
            f"{what} {name!r} is not a valid name (letters, digits, '_', '.', '-'; no leading '.', no '..')"
        )
    return name


def grid_units(grid: float) -> int:
    """n such that grid == 1/n; ConfigError when grid is not the reciprocal of a positive integer."""
    if isinstance(grid, bool) or not isinstance(grid, (int, float)) or not (0 < grid <= 1):
        raise ConfigError(f"grid must be a number in (0, 1], got {grid!r}")
    n = round(1 / grid)
    if abs(1 / grid - n) > 1e-6:
        raise ConfigError(f"grid must be 1/n for an integer n (e.g. 0.05, 0.1, 0.25), got {grid!r}")
    return n


def _format_weight(w: float) -> str:
    """Canonical text of a weight: at least two decimals, no trailing zeros beyond ("0.70", "0.125")."""
    text = f"{w:.10f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


# ---------------------------------------------------------------------------- mixture keys


@dataclass(frozen=True)
class MixtureKey:
    """A mixture of experts: names sorted, one rounded weight each. Hashable, equal for equal mixtures."""

    experts: tuple[str, ...]
    """Expert names, sorted (the constructor sorts them together with their weights)."""
    weights: tuple[float, ...]
    """Weight of each expert, rounded to 10 decimals so that equal mixtures compare equal."""

    def __post_init__(self) -> None:
        if len(self.experts) != len(self.weights) or not self.experts:
            raise ConfigError("a mixture needs at least one expert and exactly one weight per expert")
        if len(set(self.experts)) != len(self.experts):
            raise ConfigError(f"mixture names an expert twice: {list(self.experts)}")
        for name, w in zip(self.experts, self.weights):
            check_name(name, "mixture expert")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ConfigError(f"mixture weight for {name!r} must be a finite number, got {w!r}")
        pairs = sorted(zip(self.experts, (round(float(w), 10) + 0.0 for w in self.weights)))
        object.__setattr__(self, "experts", tuple(n for n, _ in pairs))
        object.__setattr__(self, "weights", tuple(w for _, w in pairs))

    def __str__(self) -> str:
        return ",".join(f"{n}={_format_weight(w)}" for n, w in zip(self.experts, self.weights))

    @property
    def digest(self) -> str:
        """First 16 hex digits of sha256(str(self)): a short stable id, e.g. for adapter folder names."""
        return hashlib.sha256(str(self).encode("utf-8")).hexdigest()[:16]

    def as_dict(self) -> dict[str, float]:
        """Expert name -> weight."""
        return dict(zip(self.experts, self.weights))

    @classmethod
    def from_units(cls, units: dict[str, int], n: int) -> MixtureKey:
        """A key from integer grid units (weight = units / n), dropping experts with 0 units."""
        kept = {name: u for name, u in units.items() if u != 0}
        return cls(tuple(kept), tuple(u / n for u in kept.values()))

    @classmethod
    def from_dict(
        cls,
        weights: Any,
        grid: float,
        known_experts: list[str] | tuple[str, ...] | None = None,
        normalise: bool = True,
    ) -> MixtureKey:
        """A key from {expert: weight}, e.g. an explicit mixture in a request.

        normalise=True: weights must be >= 0 with a positive sum; they are divided by the sum
        and rounded to the grid like the gate's (largest remainder, sum exactly 1).
        normalise=False: each weight (negative allowed) is rounded to the nearest grid multiple.
        Zero weights are dropped. ConfigError names the offending entry: an expert not in
        `known_experts`, a non-numeric, NaN or infinite weight, or nothing left.
        """
        n = grid_units(grid)
        if not isinstance(weights, dict) or not weights:
            raise ConfigError(f"mixture must be a non-empty object {{expert: weight}}, got {weights!r}")
        for name, w in weights.items():
            check_name(name, "mixture expert")
            if known_experts is not None and name not in known_experts:
                raise ConfigError(
                    f"mixture names unknown expert {name!r}; known: {', '.join(sorted(known_experts))}"
                )
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ConfigError(f"mixture weight for {name!r} must be a finite number, got {w!r}")
        names = sorted(weights)
        values = torch.tensor([float(weights[k]) for k in names], dtype=torch.float64)  # [k]
        if normalise:
            if (values < 0).any() or values.sum() <= 0:
                raise ConfigError(
                    f"mixture weights must be >= 0 with a positive sum to normalise, got {weights!r}"
                )
            units = round_to_grid((values / values.sum())[None], n)[0]  # [k]
        else:
            units = torch.round(values * n).long()  # [k]
        if not units.any():
            raise ConfigError(f"mixture {weights!r} has no weight left after rounding to the grid {grid}")
        return cls.from_units(dict(zip(names, units.tolist())), n)


def round_to_grid(weights: torch.Tensor, n: int) -> torch.Tensor:
    """Largest-remainder rounding of rows that sum to 1 into integer units of 1/n that sum to n.

    weights: [B, k] float, each row >= 0 summing to 1, columns in order of preference
    (ties in remainder go to the earlier column). Returns int64 [B, k], each row summing to n.
    """
    scaled = weights.to(torch.float64) * n  # [B, k]
    units = torch.floor(scaled + 1e-9)  # [B, k]
    remainder = scaled - units  # [B, k]
    deficit = (n - units.sum(1, keepdim=True)).clamp(min=0)  # [B, 1]
    order = torch.sort(remainder, dim=1, descending=True, stable=True).indices  # [B, k]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))  # [B, k]
    return (units + (rank < deficit).to(units.dtype)).long()  # [B, k]


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
    """features [B, D] -> expert logits [B, E]; `mixtures` turns them into MixtureKeys."""

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
    def mixtures(self, features: torch.Tensor) -> list[MixtureKey]:
        """One MixtureKey per row of features [B, D]: top-k, renormalised, rounded to the grid."""
        n = grid_units(self.config.grid)
        probs = self.probabilities(features).double()  # [B, E]
        order = torch.sort(probs, dim=1, descending=True, stable=True).indices[
            :, : self.config.top_k
        ]  # [B, k]
        top = probs.gather(1, order)  # [B, k]
        units = round_to_grid(top / top.sum(1, keepdim=True), n)  # [B, k]
        names = self.config.experts
        return [
            MixtureKey.from_units({names[i]: u for i, u in zip(row_idx, row_units)}, n)
            for row_idx, row_units in zip(order.tolist(), units.tolist())
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
