"""What a student's HF config says about the linear modules a LoRA expert can target.

Supported: decoder-only models whose layers are `model.layers.<i>.self_attn.{q,k,v,o}_proj`
and `model.layers.<i>.mlp.{gate,up,down}_proj` (Llama, Mistral, Qwen2/3, Gemma/Gemma2).
Shapes are (in_features, out_features), as `nn.Linear` stores them transposed:
a LoRA on such a module has A [r, in_features] and B [out_features, r].
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mode_cotd.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
"""`model_type` values whose layer layout this module knows."""

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
"""Linear modules under `self_attn`."""
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
"""Linear modules under `mlp`."""

VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}
)
"""Config keys left out of `config_sha256`: they record how a folder was saved, not what the model is."""

_LAYER_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.([A-Za-z0-9_]+)$")


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of an HF config (sorted keys, compact), without VOLATILE_CONFIG_KEYS.

    The same model saved by another transformers version, or in another dtype, keeps its hash.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"student config must be a JSON object, got {type(config).__name__}")
    kept = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def read_config(source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(config dict, label for messages) from a dict, a model folder or a config.json path."""
    if isinstance(source, dict):
        return source, "student config"
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: student config not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable student config ({e})") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: student config must be a JSON object")
    return config, str(path)


@dataclass(frozen=True)
class Architecture:
    """The LoRA-targetable layout of a student."""

    model_type: str
    """HF `model_type`, one of SUPPORTED_MODEL_TYPES."""
    num_hidden_layers: int
    """Number of decoder layers; module paths name layers 0 .. num_hidden_layers - 1."""
    hidden_size: int
    """Model width (the input embedding dimension)."""
    linear_modules: dict[str, tuple[int, int]]
    """Short module name (e.g. "q_proj") -> (in_features, out_features)."""

    def module_shape(self, module_path: str) -> tuple[int, int]:
        """(in_features, out_features) of a full module path such as
        `base_model.model.model.layers.3.self_attn.q_proj`; ConfigError when the student lacks it."""
        match = _LAYER_MODULE.search(module_path)
        if match is None:
            raise ConfigError(f"module {module_path!r} is not a decoder-layer linear module of this student")
        layer, block, name = int(match[1]), match[2], match[3]
        expected_block = "self_attn" if name in ATTENTION_MODULES else "mlp" if name in MLP_MODULES else None
        if expected_block != block or name not in self.linear_modules:
            raise ConfigError(f"module {module_path!r}: this {self.model_type} student has no {block}.{name}")
        if layer >= self.num_hidden_layers:
            raise ConfigError(
                f"module {module_path!r}: layer {layer} does not exist (student has {self.num_hidden_layers})"
            )
        return self.linear_modules[name]


def _positive_int(config: dict[str, Any], key: str, label: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{label}: field {key!r} must be a positive integer, got {value!r}")
    return value


def architecture_of(source: str | Path | dict[str, Any]) -> Architecture:
    """The Architecture of a student given as a config dict, a model folder or a config.json path."""
    config, label = read_config(source)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{label}: unknown architecture model_type={model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    hidden = _positive_int(config, "hidden_size", label)
    heads = _positive_int(config, "num_attention_heads", label)
    kv_heads = (
        _positive_int(config, "num_key_value_heads", label) if "num_key_value_heads" in config else heads
    )
    head_dim = config.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(
                f"{label}: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
            )
        head_dim = hidden // heads
    else:
        head_dim = _positive_int(config, "head_dim", label)
    intermediate = _positive_int(config, "intermediate_size", label)
    modules = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }
    return Architecture(
        model_type=model_type,
        num_hidden_layers=_positive_int(config, "num_hidden_layers", label),
        hidden_size=hidden,
        linear_modules=modules,
    )
