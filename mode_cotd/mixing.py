"""Mixing LoRA experts: exact composition, the paper's linear merge, SVD compression.

Notation, per target module: expert i has A_i [r_i, in], B_i [out, r_i] and scaling
s_i = alpha_i / r_i (alpha_i / sqrt(r_i) with rsLoRA), so its update is ΔW_i = s_i·B_i·A_i
[out, in], and a Linear's output becomes y = x·Wᵀ + x·ΔWᵀ. A mixture with scalar weights
w_i (any sign) means ΔW = Σ w_i·ΔW_i. An expert that lacks a module contributes zero there.

`reference_delta` is the plain reference each op is tested against. Ops return fp32
tensors on the CPU whatever the input dtype; weights are Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from mode_cotd.adapter import LoraAdapter, adapter_from_modules
from mode_cotd.errors import BundleError, ConfigError


def _check_inputs(adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> list[float]:
    if not adapters:
        raise ConfigError("mixture: no adapters given")
    if len(adapters) != len(weights):
        raise ConfigError(f"mixture: {len(adapters)} adapters but {len(weights)} weights")
    out = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in out):
        raise ConfigError(f"mixture: weights must be finite, got {out}")
    return out


def _module_shapes(adapters: Sequence[LoraAdapter]) -> dict[str, tuple[int, int]]:
    """Union of module paths -> (in, out), sorted; BundleError if experts disagree on a shape."""
    shapes: dict[str, tuple[int, int]] = {}
    for i, adapter in enumerate(adapters):
        for path, (a, b) in adapter.modules().items():
            shape = (a.shape[1], b.shape[0])
            if shapes.setdefault(path, shape) != shape:
                raise BundleError(
                    f"mixture: expert {i} has module {path} as in={shape[0]}, out={shape[1]}, "
                    f"another expert has in={shapes[path][0]}, out={shapes[path][1]}"
                )
    return dict(sorted(shapes.items()))


def _common_base(adapters: Sequence[LoraAdapter]) -> str | None:
    names = {a.base_model_name_or_path for a in adapters}
    return names.pop() if len(names) == 1 else None


def _blocks(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, path: str, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) of one expert in fp32; zeros when the expert lacks the module."""
    pair = modules.get(path)
    if pair is None:
        return torch.zeros(rank, shape[0]), torch.zeros(shape[1], rank)
    a, b = pair
    return a.detach().float().cpu(), b.detach().float().cpu()


def compose_exact(adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> LoraAdapter:
    """One LoRA that computes Σ_i w_i·s_i·B_i·A_i exactly, for every module in the union.

    Per module: A = cat_i(A_i) along rank -> [R, in]; B = cat_i(w_i·s_i·B_i) along rank
    -> [out, R]; so B·A = Σ_i w_i·s_i·B_i·A_i. R = Σ_i r_i for every module (an expert that
    lacks a module gives zero blocks there). The result has r = lora_alpha = R and no
    rsLoRA, so its scaling is 1. Ranks, alphas and rsLoRA may differ between experts;
    weights may be negative. fp32 throughout.
    """
    weights = _check_inputs(adapters, weights)
    shapes = _module_shapes(adapters)
    rank = sum(a.r for a in adapters)
    expert_modules = [a.modules() for a in adapters]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, shape in shapes.items():
        a_blocks, b_blocks = [], []
        for adapter, mods, w in zip(adapters, expert_modules, weights):
            a, b = _blocks(mods, adapter.r, path, shape)  # [r_i, in], [out, r_i]
            a_blocks.append(a)
            b_blocks.append(b * (w * adapter.scaling()))
        modules[path] = (torch.cat(a_blocks, 0), torch.cat(b_blocks, 1))  # [R, in], [out, R]
    return adapter_from_modules(modules, rank, float(rank), False, _common_base(adapters))


def merge_linear(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    convention: Literal["lorahub", "peft"] = "lorahub",
) -> LoraAdapter:
    """The paper's linear merge of A and B separately: an approximation of the mixture.

    All experts must share one rank r. Per module (absent experts are skipped):

    - "lorahub" (the paper / LoraHub `get_final_weights`): A' = Σ_i w_i·A_i [r, in],
      B' = Σ_i w_i·(s_i/s_1)·B_i [out, r], with the first expert's r, alpha and rsLoRA, so
      ΔW' = s_1·B'·A' = (Σ_i w_i·s_i·B_i)(Σ_j w_j·A_j). LoraHub requires equal configs;
      then s_i/s_1 = 1 and this is exactly its merge. Unequal scalings are folded into B.
    - "peft" (`add_weighted_adapter(combination_type="linear")`): with c_i = w_i·s_i,
      A' = Σ_i sign(c_i)·sqrt(|c_i|)·A_i, B' = Σ_i sqrt(|c_i|)·B_i, and r = lora_alpha = r
      with no rsLoRA, so the scaling is 1. (peft copies use_rslora from the first expert's
      config, which would scale by sqrt(r) if it was set; here the scaling is always 1.)

    Neither equals Σ_i w_i·s_i·B_i·A_i for two or more experts (the cross terms remain).
    For one expert, "peft" is exact and "lorahub" gives w²·s·B·A. fp32 throughout.
    """
    weights = _check_inputs(adapters, weights)
    ranks = sorted({a.r for a in adapters})
    if len(ranks) != 1:
        raise BundleError(f"merge_linear: experts must share one rank, got ranks {ranks}")
    rank, first = ranks[0], adapters[0]
    if convention == "lorahub":
        a_coef = list(weights)
        b_coef = [w * a.scaling() / first.scaling() for a, w in zip(adapters, weights)]
    elif convention == "peft":
        c = [w * a.scaling() for a, w in zip(adapters, weights)]
        a_coef = [math.copysign(math.sqrt(abs(ci)), ci) for ci in c]
        b_coef = [math.sqrt(abs(ci)) for ci in c]
    else:
        raise ConfigError(f"merge_linear: convention must be 'lorahub' or 'peft', got {convention!r}")

    expert_modules = [a.modules() for a in adapters]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, (n_in, n_out) in _module_shapes(adapters).items():
        a_sum, b_sum = torch.zeros(rank, n_in), torch.zeros(n_out, rank)  # [r, in], [out, r]
        for mods, ca, cb in zip(expert_modules, a_coef, b_coef):
            pair = mods.get(path)
            if pair is not None:
                a_sum += ca * pair[0].detach().float().cpu()
                b_sum += cb * pair[1].detach().float().cpu()
        modules[path] = (a_sum, b_sum)
    if convention == "lorahub":
        return adapter_from_modules(modules, rank, first.lora_alpha, first.use_rslora, _common_base(adapters))
    return adapter_from_modules(modules, rank, float(rank), False, _common_base(adapters))


def mix(adapters: Sequence[LoraAdapter], weights: Sequence[float], mode: str,
        over: LoraAdapter | None = None) -> LoraAdapter:
    """One composite adapter of `mode` ("exact" or "linear", LoraHub's convention), optionally on top of `over`
    (a shared adapter) added exactly:

        exact:   ΔW = [ΔW_over +] Σ_i w_i·s_i·B_i·A_i                       (compose_exact)
        linear:  ΔW = [ΔW_over +] s_1·(Σ_i w_i·(s_i/s_1)·B_i)(Σ_j w_j·A_j)   (merge_linear, then compose_exact)

    The adapter `over` keeps weight 1 and is never merged linearly with the others (its cross terms with
    them would change its own ΔW)."""
    if mode == "exact":
        mixed = compose_exact(adapters, weights)
    elif mode == "linear":
        mixed = merge_linear(adapters, weights)
    else:
        raise ConfigError(f"mixture mode must be 'exact' or 'linear', got {mode!r}")
    return mixed if over is None else compose_exact([over, mixed], [1.0, 1.0])


def compress_svd(adapter: LoraAdapter, rank: int) -> tuple[LoraAdapter, float]:
    """Truncated SVD of ΔW = s·B·A per module, without forming the [out, in] matrix.

    Per module: B = Q_B·R_B and Aᵀ = Q_A·R_A (reduced QR), core = s·R_B·R_Aᵀ [≤r, ≤r] =
    U·diag(σ)·Vᵀ, so ΔW = (Q_B·U)·diag(σ)·(Q_A·V)ᵀ. Keeping the k = min(rank, r) largest σ:
    B' = Q_B·U_k·diag(sqrt σ_k) [out, k], A' = diag(sqrt σ_k)·V_kᵀ·Q_Aᵀ [k, in], zero-padded
    to k where a module has fewer non-zero σ. The result has r = lora_alpha = k and no
    rsLoRA (scaling 1). Exact when rank ≥ the adapter's r.

    Returns (compressed adapter, max over modules of ‖ΔW − ΔW'‖_F / ‖ΔW‖_F), the error
    read from the dropped σ (0 for an all-zero module). Factorisations run in float64;
    tensors are returned in fp32.
    """
    if not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"compress_svd: rank must be a positive integer, got {rank!r}")
    k = min(rank, adapter.r)
    s = adapter.scaling()
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    max_error = 0.0
    for path, (a, b) in adapter.modules().items():
        a64, b64 = a.detach().cpu().double(), b.detach().cpu().double()  # [r, in], [out, r]
        q_b, r_b = torch.linalg.qr(b64)  # [out, m_b], [m_b, r]
        q_a, r_a = torch.linalg.qr(a64.T)  # [in, m_a], [m_a, r]
        u, sigma, vh = torch.linalg.svd(s * r_b @ r_a.T, full_matrices=False)  # [m_b, m], [m], [m, m_a]
        kept = min(k, sigma.numel())
        root = sigma[:kept].sqrt()  # [kept]
        new_b = torch.zeros(b64.shape[0], k, dtype=torch.float64)  # [out, k]
        new_a = torch.zeros(k, a64.shape[1], dtype=torch.float64)  # [k, in]
        new_b[:, :kept] = q_b @ u[:, :kept] * root
        new_a[:kept] = root[:, None] * vh[:kept] @ q_a.T
        total = sigma.square().sum()
        if total > 0:
            max_error = max(max_error, (sigma[kept:].square().sum() / total).sqrt().item())
        modules[path] = (new_a.float(), new_b.float())
    result = adapter_from_modules(modules, k, float(k), False, adapter.base_model_name_or_path)
    return result, max_error


def delta_weight(adapter: LoraAdapter, module_path: str) -> torch.Tensor:
    """Dense ΔW = s·B·A [out, in] of one module, fp32 (for tests and small checks)."""
    a, b = adapter.modules()[module_path]
    return adapter.scaling() * b.detach().float().cpu() @ a.detach().float().cpu()


def reference_delta(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], module_path: str, x: torch.Tensor
) -> torch.Tensor:
    """Plain reference: Σ_i w_i·s_i·(x @ A_iᵀ @ B_iᵀ) for one module; x [N, in] -> [N, out].

    Experts lacking the module are skipped. Computed in float64 when x is float64, else
    fp32; returns that dtype. BundleError if no expert has the module.
    """
    weights = _check_inputs(adapters, weights)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    out = None
    for adapter, w in zip(adapters, weights):
        pair = adapter.modules().get(module_path)
        if pair is None:
            continue
        a, b = pair[0].to(dtype), pair[1].to(dtype)  # [r, in], [out, r]
        term = (w * adapter.scaling()) * (x @ a.T @ b.T)  # [N, out]
        out = term if out is None else out + term
    if out is None:
        raise BundleError(f"reference_delta: no expert has module {module_path}")
    return out
