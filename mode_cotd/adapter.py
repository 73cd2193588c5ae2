"""LoRA adapters in memory, and their PEFT-format folders on disk.

A folder holds `adapter_config.json` and `adapter_model.safetensors`, exactly as
`peft.PeftModel.save_pretrained` writes them, so that peft and vLLM load it unmodified.
Only safetensors are read: a folder with pickled weights (`.bin`, `.pt`, ...) is refused,
and `torch.load` is never called.

Rank convention: in a `LoraAdapter` every module has the same rank `r`. A PEFT config
with `rank_pattern` / `alpha_pattern` (per-module ranks and alphas) is normalised on load:
lower-rank modules are zero-padded to the largest rank, and each module's scaling ratio
to the nominal scaling is folded into its B. Zero rows of A and zero columns of B add
nothing to B·A, so the adapter computes the same ΔW; it is written back without patterns,
which keeps the file simple and within what vLLM's LoRA loader supports.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mode_cotd.atomic import atomic_dir
from mode_cotd.checksums import file_checksums  # noqa: F401  (re-exported for mixture_union, distill)
from mode_cotd.errors import BundleError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
PEFT_PREFIX = "base_model.model."
"""What PeftModel puts before a base-model module name in its state-dict keys."""


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling s: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass
class LoraAdapter:
    """A LoRA adapter: ΔW = scaling() · B @ A for each module. Every module has rank `r`."""

    r: int
    """Rank of every module (the largest module rank when the file used rank_pattern)."""
    lora_alpha: float
    """LoRA alpha; the scaling is alpha / r (alpha / sqrt(r) with rsLoRA)."""
    target_modules: list[str]
    """Short module names the adapter targets, e.g. ["q_proj", "v_proj"], sorted."""
    weights: dict[str, torch.Tensor]
    """PEFT state-dict keys -> tensors: `<module>.lora_A.weight` [r, in], `<module>.lora_B.weight` [out, r]."""
    use_rslora: bool = False
    """rsLoRA scaling (alpha / sqrt(r)) instead of alpha / r."""
    base_model_name_or_path: str | None = None
    """The student this adapter was trained on, as recorded in adapter_config.json."""

    def scaling(self) -> float:
        """The factor s in ΔW = s · B @ A."""
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module path (key without `.lora_A.weight`) -> (A [r, in], B [out, r]), sorted by path."""
        paths = sorted(k[: -len(A_SUFFIX)] for k in self.weights if k.endswith(A_SUFFIX))
        return {p: (self.weights[p + A_SUFFIX], self.weights[p + B_SUFFIX]) for p in paths}


def short_name(module_path: str) -> str:
    """`base_model.model.model.layers.0.self_attn.q_proj` -> `q_proj`."""
    return module_path.rsplit(".", 1)[-1]


def adapter_from_modules(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    r: int,
    lora_alpha: float,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
) -> LoraAdapter:
    """Build a LoraAdapter from module path -> (A [r, in], B [out, r]); target_modules follow the paths."""
    weights: dict[str, torch.Tensor] = {}
    for path, (a, b) in modules.items():
        weights[path + A_SUFFIX] = a
        weights[path + B_SUFFIX] = b
    return LoraAdapter(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=sorted({short_name(p) for p in modules}),
        weights=weights,
        use_rslora=use_rslora,
        base_model_name_or_path=base_model_name_or_path,
    )


# ---------------------------------------------------------------------------- loading


def _refuse_pickles(folder: Path) -> None:
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() in PICKLE_SUFFIXES:
            raise BundleError(f"{f}: pickled weights are refused; convert to safetensors")


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise BundleError(f"{path}: missing adapter config")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(config, dict):
        raise BundleError(f"{path}: expected a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise BundleError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for field in ("use_dora", "lora_bias"):
        if config.get(field):
            raise BundleError(f"{path}: {field}=true is not supported")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise BundleError(f"{path}: field 'r' must be a positive integer, got {config.get('r')!r}")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha == 0:
        raise BundleError(f"{path}: field 'lora_alpha' must be a non-zero number, got {alpha!r}")
    return config


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise BundleError(f"{path}: missing adapter weights")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable safetensors ({e})") from e
    if not tensors:
        raise BundleError(f"{path}: holds no tensors")
    for key, t in tensors.items():
        if not key.endswith((A_SUFFIX, B_SUFFIX)):
            raise BundleError(f"{path}: unsupported tensor {key!r} (only lora_A/lora_B weights)")
        if not t.is_floating_point() or t.dim() != 2:
            raise BundleError(f"{path}: {key} must be a 2-D float tensor, got {t.dtype} {list(t.shape)}")
    if not _all_finite(list(tensors.values())):  # one check over all; then find which, to name it
        bad = next(key for key, t in tensors.items() if not torch.isfinite(t).all())
        raise BundleError(f"{path}: {bad} has non-finite values")
    return tensors


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite: per dtype, the tensors laid end to end, whose min and max are
    both finite exactly when every value is (NaN propagates through both). An adapter has ~400 small tensors: an
    isfinite each took ~25 µs, half the time of loading a bundle of 1,000 experts; this takes ~3 ms for them all."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    return all(bool(torch.isfinite(v)) for flat in by_dtype.values() for v in torch.aminmax(torch.cat(flat)))


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): first key matching `(.*\\.)?(key)$`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def load_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

    Raises BundleError naming the file for: pickled weights present, a missing or
    unreadable file, non-LoRA or DoRA configs, tensors other than lora_A/lora_B, A/B
    shapes that do not fit, and ranks that disagree with the config.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise BundleError(f"{folder}: adapter folder not found")
    _refuse_pickles(folder)
    config = _read_config(folder)
    tensors = _read_weights(folder)
    weights_path = folder / WEIGHTS_NAME

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise BundleError(f"{folder / CONFIG_NAME}: rank_pattern and alpha_pattern must be objects")
    use_rslora = bool(config.get("use_rslora", False))
    default_alpha = float(config.get("lora_alpha", 8))
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, int, float]] = {}
    paths = sorted({k.removesuffix(A_SUFFIX).removesuffix(B_SUFFIX) for k in tensors})
    for p in paths:
        a, b = tensors.get(p + A_SUFFIX), tensors.get(p + B_SUFFIX)
        if a is None or b is None:
            raise BundleError(f"{weights_path}: module {p} lacks its lora_{'A' if a is None else 'B'} weight")
        if b.shape[1] != a.shape[0]:
            raise BundleError(
                f"{weights_path}: module {p}: lora_B {list(b.shape)} does not fit lora_A {list(a.shape)}"
            )
        name = p.removeprefix(PEFT_PREFIX)
        try:
            rank = int(_pattern_value(rank_pattern, name, config["r"]))
            alpha = float(_pattern_value(alpha_pattern, name, default_alpha))
        except (TypeError, ValueError, re.error) as e:
            raise BundleError(f"{folder / CONFIG_NAME}: bad rank_pattern/alpha_pattern ({e})") from e
        if a.shape[0] != rank:
            raise BundleError(
                f"{weights_path}: module {p} has rank {a.shape[0]} but {folder / CONFIG_NAME} says {rank}"
            )
        modules[p] = (a, b, rank, alpha)

    r = max(rank for _, _, rank, _ in modules.values())
    nominal = lora_scaling(default_alpha, r, use_rslora)
    uniform: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for p, (a, b, rank, alpha) in modules.items():
        ratio = lora_scaling(alpha, rank, use_rslora) / nominal
        if rank != r or ratio != 1.0:
            a = torch.cat([a.float(), a.new_zeros(r - rank, a.shape[1], dtype=torch.float32)])  # [r, in]
            b = torch.cat(
                [b.float() * ratio, b.new_zeros(b.shape[0], r - rank, dtype=torch.float32)], 1
            )  # [out, r]
        uniform[p] = (a, b)
    return adapter_from_modules(uniform, r, default_alpha, use_rslora, config.get("base_model_name_or_path"))


# ---------------------------------------------------------------------------- saving


def adapter_config(adapter: LoraAdapter) -> dict:
    """The adapter_config.json that peft's LoraConfig and vLLM's LoRA loader read.

    target_modules is the union of `adapter.target_modules` and the modules the weights
    hold, so no weight is ignored on load; an integral alpha is written as an int.
    """
    alpha = float(adapter.lora_alpha)
    targets = set(adapter.target_modules) | {short_name(p) for p in adapter.modules()}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.r,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "target_modules": sorted(targets),
        "use_rslora": adapter.use_rslora,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": adapter.base_model_name_or_path,
    }


def _checked_tensors(adapter: LoraAdapter, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    a_paths = {k.removesuffix(A_SUFFIX) for k in adapter.weights if k.endswith(A_SUFFIX)}
    b_paths = {k.removesuffix(B_SUFFIX) for k in adapter.weights if k.endswith(B_SUFFIX)}
    if not a_paths or a_paths != b_paths or len(adapter.weights) != 2 * len(a_paths):
        raise BundleError("adapter to save must hold exactly one lora_A and one lora_B weight per module")
    modules = adapter.modules()
    out: dict[str, torch.Tensor] = {}
    for p, (a, b) in modules.items():
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != adapter.r or b.shape[1] != adapter.r:
            raise BundleError(
                f"adapter to save: module {p} has A {list(a.shape)}, B {list(b.shape)}; rank must be r={adapter.r}"
            )
        out[p + A_SUFFIX] = a.detach().to("cpu", dtype or a.dtype).contiguous()
        out[p + B_SUFFIX] = b.detach().to("cpu", dtype or b.dtype).contiguous()
    return out


def save_adapter(adapter: LoraAdapter, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `adapter` as a PEFT folder at `path`, atomically (all or nothing); return the path.

    `dtype` casts every tensor (e.g. torch.bfloat16); None keeps each tensor's dtype.
    """
    from safetensors.torch import save

    data = save(_checked_tensors(adapter, dtype), metadata={"format": "pt"})
    target = Path(path)
    with atomic_dir(target) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(data)
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter_config(adapter), indent=2) + "\n", encoding="utf-8")
    return target

