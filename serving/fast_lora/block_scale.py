"""Block-scaled mixture LoRA: every per-token mixture of E experts in one GEMM pair.

A mixture of E LoRA experts with per-token weights w[t, i] on one linear layer adds

    y[t] += Σᵢ w[t, i] · sᵢ · Bᵢ (Aᵢ x[t])

With the union A = cat_i(Aᵢ) `[E·r, H]` and B = cat_i(sᵢ Bᵢ) `[N, E·r]` (experts zero-padded to one
rank r, see build_union) this is exactly

    h = x @ Aᵀ                                   [T, E·r]
    h ← h ⊙ repeat_interleave(w, r, dim=1)       [T, E·r]   (block i of h scaled by w[:, i])
    y += h @ Bᵀ                                  [T, N]

one shrink and one expand whatever the number of distinct mixtures in the batch (docs/performance.md,
"Mixtures"). Pure torch, no host synchronisation: it runs on CPU and CUDA and can be captured in a
CUDA graph.

Rounding, chosen by device (`native_dtype=None`):
- CPU: the matmuls run in float32 (ACCUMULATE; float64 stays float64) as in serving.fast_lora.ops:
  bf16 x bf16 products are exact in float32, h is not rounded between shrink and expand, and y gets
  one rounding when the update is added. On CPUs without native bf16 a thin bf16 matmul is far
  slower than the same one in float32.
- CUDA (any non-CPU device): the matmuls run in the input dtype (bf16/fp16 tensor cores, which
  accumulate in float32 inside the GEMM). h is rounded to x.dtype by the shrink; the block scale is
  computed in float32 and rounded to x.dtype once; the expand is fused with the add into y
  (`addmm_`) when y has x's dtype. Casting the union to float32 every step would cost more
  memory traffic than the GEMMs themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

ACCUMULATE = torch.float32
"""Dtype of the CPU path's matmuls (float64 inputs stay float64)."""


def _check(y: torch.Tensor, x: torch.Tensor, a_union: torch.Tensor, b_union: torch.Tensor,
           weights: torch.Tensor, rank: int) -> None:
    """ValueError naming the first mismatch between the documented shapes."""
    for name, t in (("y", y), ("x", x), ("a_union", a_union), ("b_union", b_union), ("weights", weights)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not weights.is_floating_point():
        raise ValueError(f"weights must be floating point, got {weights.dtype}")
    (t, h), n, e = x.shape, y.shape[1], weights.shape[1]
    if y.shape[0] != t:
        raise ValueError(f"y has {y.shape[0]} rows but x has T={t}")
    if weights.shape[0] != t:
        raise ValueError(f"weights has {weights.shape[0]} rows but x has T={t}")
    if a_union.shape != (e * rank, h):
        raise ValueError(f"a_union has shape {tuple(a_union.shape)}, expected [E·r, H] = [{e}·{rank}, {h}] "
                         f"(E from weights, H from x)")
    if b_union.shape != (n, e * rank):
        raise ValueError(f"b_union has shape {tuple(b_union.shape)}, expected [N, E·r] = [{n}, {e}·{rank}] "
                         f"(N from y, E from weights)")


def block_scaled_lora(y: torch.Tensor, x: torch.Tensor, a_union: torch.Tensor, b_union: torch.Tensor,
                      weights: torch.Tensor, rank: int, native_dtype: bool | None = None) -> None:
    """y += ((x @ a_unionᵀ) ⊙ repeat_interleave(weights, rank, dim=1)) @ b_unionᵀ, in place.

    y `[T, N]`, x `[T, H]`, a_union `[E·r, H]`, b_union `[N, E·r]` (scales folded in), weights `[T, E]`
    (floating point; zero and negative weights are fine), rank = r, the block width of each expert.
    native_dtype: matmuls in x.dtype (True) or in float32 (False); None picks by device (module
    docstring). Raises ValueError on a shape mismatch; returns None.
    """
    _check(y, x, a_union, b_union, weights, rank)
    t, e = weights.shape
    native = x.device.type != "cpu" if native_dtype is None else native_dtype
    if native:
        dtype = x.dtype
        h = x @ a_union.to(dtype).t()  # [T, E·r], rounded to dtype
        h.view(t, e, rank).mul_(weights[:, :, None])  # computed in float32, rounded to dtype once
        b = b_union.to(dtype)
        if y.dtype == dtype:
            y.addmm_(h, b.t())  # [T, N]; expand and add in one GEMM
        else:
            y.add_(h @ b.t())  # [T, N]
        return
    acc = torch.promote_types(x.dtype, ACCUMULATE)
    h = x.to(acc) @ a_union.to(acc).t()  # [T, E·r]
    h.view(t, e, rank).mul_(weights[:, :, None])  # [T, E, r] ⊙ [T, E, 1]
    y.add_((h @ b_union.to(acc).t()).to(y.dtype))  # [T, N]


def build_union(experts: Sequence[tuple[torch.Tensor, torch.Tensor, float]], rank: int | None = None,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(a_union `[E·r, H]`, b_union `[N, E·r]`, r) from experts [(Aᵢ `[rᵢ, H]`, Bᵢ `[N, rᵢ]`, sᵢ), …].

    Unequal ranks are zero-padded to r = max rᵢ (or `rank` if given, ≥ max rᵢ): rows i·r … i·r+rᵢ-1
    of a_union hold Aᵢ and the same columns of b_union hold sᵢ·Bᵢ; the padding rows and columns are
    zero, so they add exactly zero. sᵢ·Bᵢ is computed in float32 (float64 stays float64) and rounded
    to `dtype` (default: A₀'s) once. Device: A₀'s.
    """
    if not experts:
        raise ValueError("build_union needs at least one expert")
    a0, b0, _ = experts[0]
    h, n = a0.shape[-1], b0.shape[0]
    for i, (a, b, _) in enumerate(experts):
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"expert {i}: A and B must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
        if a.shape[1] != h or b.shape[0] != n:
            raise ValueError(f"expert {i}: A {tuple(a.shape)} / B {tuple(b.shape)} do not match H={h}, N={n} "
                             "of expert 0")
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"expert {i}: B has {b.shape[1]} columns but A has rank {a.shape[0]}")
    max_rank = max(a.shape[0] for a, _, _ in experts)
    r = max_rank if rank is None else rank
    if r < max_rank:
        raise ValueError(f"rank={r} is below the largest expert rank {max_rank}")
    dtype = dtype or a0.dtype
    e = len(experts)
    a_union = torch.zeros(e * r, h, dtype=dtype, device=a0.device)  # [E·r, H]
    b_union = torch.zeros(n, e * r, dtype=dtype, device=a0.device)  # [N, E·r]
    for i, (a, b, s) in enumerate(experts):
        k = a.shape[0]
        acc = torch.promote_types(b.dtype, ACCUMULATE)
        a_union[i * r : i * r + k] = a.to(a0.device)
        b_union[:, i * r : i * r + k] = (b.to(device=a0.device, dtype=acc) * s).to(dtype)
    return a_union, b_union, r


def dense_weights(mixtures: Sequence[Mapping[int, float]], experts: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """weights `[T, E]` from per-token sparse mixtures: row t has mixtures[t][i] in column i, zero elsewhere.

    T = len(mixtures), E = experts; built on the host and copied to `device` in one transfer.
    """
    rows = [[0.0] * experts for _ in mixtures]
    for t, mixture in enumerate(mixtures):
        for i, w in mixture.items():
            if not 0 <= i < experts:
                raise ValueError(f"token {t}: expert index {i} outside [0, {experts})")
            rows[t][i] = float(w)
    return torch.tensor(rows, dtype=dtype).reshape(len(mixtures), experts).to(device)
