"""Plain per-row definitions of the grouped ops (serving.fast_lora.ops), for tests.

One row at a time, in float64, straight from the formulas: the fast ops and vLLM's own CPU
ops are both checked against these. `indices[t]` is row t's slot, -1 for no adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _w(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    w = stacked[slot]
    return (w[0] if w.dim() == 3 else w).double()


def lora_linear(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                indices: torch.Tensor, scale: float, output_slices: Sequence[int]) -> torch.Tensor:
    """y[t, oᵢ:oᵢ+nᵢ] + scale · x[t] @ Aᵢ[s]ᵀ @ Bᵢ[s]ᵀ for rows t with slot s ≥ 0; a new float64 tensor."""
    out = y.double().clone()
    for t, s in enumerate(indices.tolist()):
        if s < 0:
            continue
        offset = 0
        for a, b, n in zip(lora_a, lora_b, output_slices):
            out[t, offset : offset + n] += scale * (x[t].double() @ _w(a, s).t() @ _w(b, s).t())
            offset += n
    return out


def shrink(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """y[t, :R] + scale · x[t] @ A[s]ᵀ for rows t with slot s ≥ 0; a new float64 tensor."""
    out = y.double().clone()
    for t, s in enumerate(indices.tolist()):
        if s >= 0:
            a = _w(lora_a, s)
            out[t, : a.shape[0]] += scale * (x[t].double() @ a.t())
    return out


def expand(y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor, offset: int = 0,
           add: bool = True) -> torch.Tensor:
    """y[t, o:o+n] (+)= x[t] @ B[s][:n]ᵀ for rows t with slot s ≥ 0, n = min(N, y's columns - o); float64."""
    out = y.double().clone()
    for t, s in enumerate(indices.tolist()):
        if s >= 0:
            b = _w(lora_b, s)
            n = min(b.shape[0], y.shape[1] - offset)
            value = x[t, : b.shape[1]].double() @ b[:n].t()
            out[t, offset : offset + n] = out[t, offset : offset + n] + value if add else value
    return out
