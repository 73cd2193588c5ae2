"""Grouped LoRA ops: one dense matmul pair per adapter slot present in the step.

vLLM's CPU ops (vllm/lora/ops/torch_ops) gather a private copy of the adapter weights for
every token (`w[indices]`: [T, out, in]) and multiply with a batched einsum. Here every
group (slot s, rows r; serving.fast_lora.segments) multiplies its rows against the slot's
weights once: `x[r] @ Aₛᵀ` then `@ Bₛᵀ`. Rows with no adapter (slot -1) are not touched.

Weights are vLLM's stacked LoRA tensors: A `[S, 1, R, H]` (or `[S, R, H]`), B `[S, 1, N, R]`
(or `[S, N, R]`), S = LoRA slots, R = max rank (zero-padded), H = input size, N = output size.
vLLM folds `alpha / r` into B when it loads an adapter; the `scale` arguments are vLLM's.

Rounding follows vLLM's torch ops, so results agree with them to the last bit but for the order
of sums: the shrink computes in the dtype of its buffer (float32), its result is rounded to y's
dtype, multiplied by B and rounded again before it is added to y. The matmuls themselves run in
float32 (ACCUMULATE) even when y is bfloat16: bf16 x bf16 products are exact in float32, which is
what a bf16 matmul accumulates in anyway, and on CPUs without native bf16 (AVX2) a thin bf16
matmul (K = rank) is ~20x slower than the same one in float32.
Every op writes in place and returns None.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from serving.fast_lora.segments import Batched, Group, Rows, UnionRows

ACCUMULATE = torch.float32
"""Dtype the matmuls run in (inputs are first rounded to the dtype vLLM would use)."""


def _weight(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    """One slot's matrix from vLLM's stacked weights: [S, 1, P, Q] or [S, P, Q] -> [P, Q]."""
    return stacked[slot, 0] if stacked.dim() == 4 else stacked[slot]  # one indexing op


def _a(stacked: torch.Tensor, g: Group) -> torch.Tensor:
    """Group g's A `[r, H]`: its slot's first g.rank rows (all R when None; the rest are zero)."""
    return _weight(stacked, g.slot)[: g.rank]


def _b(stacked: torch.Tensor, g: Group) -> torch.Tensor:
    """Group g's B `[N, r]`: its slot's first g.rank columns (all R when None; the rest are zero)."""
    return _weight(stacked, g.slot)[:, : g.rank]


_EXACT = (torch.float32, torch.float64)
"""Dtypes that ACCUMULATE holds exactly: rounding to them and back is the identity."""


def _acc(t: torch.Tensor, rounded_to: torch.dtype) -> torch.Tensor:
    """t rounded to `rounded_to` (as vLLM's ops cast it), then held in ACCUMULATE (float64 stays float64)."""
    if t.dtype == rounded_to and rounded_to in _EXACT:
        return t  # nothing to round: skip two no-op casts (they cost more than a decode step's matmul)
    return t.to(rounded_to).to(torch.promote_types(rounded_to, ACCUMULATE))


def _mm(x: torch.Tensor, w: torch.Tensor, rounded_to: torch.dtype) -> torch.Tensor:
    """x @ wᵀ in ACCUMULATE, after rounding x and w to `rounded_to`."""
    return _acc(x, rounded_to) @ _acc(w, rounded_to).t()


def _take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _add_product(y: torch.Tensor, rows: Rows, h: torch.Tensor, b: torch.Tensor) -> None:
    """y[rows] += h @ bᵀ with no rounding in between (float32): fused `addmm_` on a slice, else one index_add_."""
    if isinstance(rows, slice):
        y[rows].addmm_(h, b.t())
    else:
        y.index_add_(0, rows, h @ b.t())


def _put(y: torch.Tensor, rows: Rows, value: torch.Tensor, add: bool) -> None:
    """y[rows] += value (add) or y[rows] = value; y may be a column slice of a larger tensor."""
    if isinstance(rows, slice) and add:
        y[rows].add_(value)
    elif isinstance(rows, slice):
        y[rows].copy_(value)
    elif add:
        y.index_add_(0, rows, value)
    else:
        y.index_copy_(0, rows, value)


def grouped_shrink(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, groups: Sequence[Group],
                   scale: float) -> None:
    """y[r, :R] += scale · x[r] @ A[s]ᵀ for each group (slot s, rows r), computed in y.dtype.

    y `[T, ≥R]` (float32 buffer), x `[T, H]`, lora_a `[S, 1, R, H]`.
    """
    for g in groups:
        a = _a(lora_a, g)  # [r, H]
        h = _mm(_take(x, g.rows), a, y.dtype)  # [t, r]
        if scale != 1.0:
            h.mul_(scale)
        _put(y[:, : a.shape[0]], g.rows, h.to(y.dtype), add=True)


def grouped_expand(y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, groups: Sequence[Group],
                   offset: int = 0, add: bool = True) -> None:
    """y[r, o:o+n] (+)= x[r] @ B[s][:n]ᵀ for each group, n = min(N, y's columns - o), computed in y.dtype.

    y `[T, ≥o+n]`, x `[T, ≥R]` (the shrink's buffer), lora_b `[S, 1, N, R]`; `add=False` overwrites the rows.
    The clamp on n matches vLLM's torch ops, where an adapter's vocab may be padded differently from y.
    """
    for g in groups:
        b = _b(lora_b, g)  # [N, r]
        n = min(b.shape[0], y.shape[1] - offset)
        out = _mm(_take(x, g.rows)[:, : b.shape[1]], b[:n], y.dtype)  # [t, n]
        _put(y[:, offset : offset + n], g.rows, out.to(y.dtype), add)


def grouped_lora_linear(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                        lora_b: Sequence[torch.Tensor], groups: Sequence[Group], scale: float,
                        output_slices: Sequence[int], buffer_dtype: torch.dtype = torch.float32,
                        batched: Batched | None = None) -> None:
    """y[r, oᵢ:oᵢ+nᵢ] += ((scale · x[r] @ Aᵢ[s]ᵀ) in buffer_dtype) @ Bᵢ[s]ᵀ, for each slice i and group (s, r).

    y `[T, Σnᵢ]`, x `[T, H]`, lora_a[i] `[S, 1, R, H]`, lora_b[i] `[S, 1, nᵢ, R]`, oᵢ = n₀ + … + nᵢ₋₁.
    The fused form of shrink + expand (vLLM's add_lora_linear). With `batched` (the same groups laid out
    by segments.batch_groups) all groups run in one bmm pair per slice; otherwise one matmul pair per group.
    """
    if batched is not None and batched.rows == x.shape[0] == y.shape[0]:
        _batched_lora_linear(y, x, lora_a, lora_b, batched, scale, output_slices, buffer_dtype)
        return
    if y.dtype == x.dtype == buffer_dtype == torch.float32:
        _float32_lora_linear(y, x, lora_a, lora_b, groups, scale, output_slices)
        return
    width = sum(output_slices)
    for g in groups:
        xg = _acc(_take(x, g.rows), buffer_dtype)  # [t, H]
        out = torch.empty(g.count, width, dtype=torch.promote_types(y.dtype, ACCUMULATE))  # [t, N]
        offset = 0
        for a_stacked, b_stacked, n in zip(lora_a, lora_b, output_slices):
            h = xg @ _acc(_a(a_stacked, g), buffer_dtype).t()  # [t, r]
            if scale != 1.0:
                h.mul_(scale)
            out[:, offset : offset + n] = _mm(h, _b(b_stacked, g), y.dtype)  # [t, n]
            offset += n
        _put(y[:, :width], g.rows, out.to(y.dtype), add=True)


def _float32_lora_linear(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                         lora_b: Sequence[torch.Tensor], groups: Sequence[Group], scale: float,
                         output_slices: Sequence[int]) -> None:
    """grouped_lora_linear when everything is float32: no rounding to do, so the expand adds straight into y.

    Contiguous rows: `y[r, o:o+n].addmm_(h, Bᵀ)` (one fused op per slice); scattered rows: one index_add_.
    """
    for g in groups:
        xg = _take(x, g.rows)  # [t, H]
        offset = 0
        for a_stacked, b_stacked, n in zip(lora_a, lora_b, output_slices):
            h = xg @ _a(a_stacked, g).t()  # [t, r]
            if scale != 1.0:
                h.mul_(scale)
            _add_product(y[:, offset : offset + n], g.rows, h, _b(b_stacked, g))  # B [n, r]
            offset += n


def expert_blocks(lora_a: torch.Tensor, lora_b: torch.Tensor, slots: Sequence[int], block_rank: int,
                  a_dtype: torch.dtype, b_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks of the experts in `slots`: (A `[K, b, H]`, B `[K, N, b]`), rounded to a_dtype / b_dtype, held in
    ACCUMULATE.

    lora_a `[S, 1, R, H]`, lora_b `[S, 1, N, R]`; expert k is slot slots[k]'s first b rows of A (columns of B),
    the expert's rank (rows past it are vLLM's zero padding). B already holds sₖBₖ (vLLM folds the scaling in
    when it loads an adapter). One gather per tensor.
    """
    index = torch.tensor(list(slots), dtype=torch.long)
    s, h, n = lora_a.shape[0], lora_a.shape[-1], lora_b.shape[-2]
    a = lora_a.reshape(s, -1, h)[:, :block_rank].index_select(0, index)  # [K, b, H]
    b = lora_b.reshape(s, n, -1)[:, :, :block_rank].index_select(0, index)  # [K, N, b]
    return _acc(a, a_dtype), _acc(b, b_dtype)


def union_weights(lora_a: torch.Tensor, lora_b: torch.Tensor, member_slots: Sequence[int], block_rank: int,
                  a_dtype: torch.dtype, b_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of the member slots' adapters: (A `[E·b, H]`, B `[N, E·b]`), block e = slot member_slots[e]'s
    expert_blocks, held in ACCUMULATE. New contiguous tensors: callers cache them."""
    a, b = expert_blocks(lora_a, lora_b, member_slots, block_rank, a_dtype, b_dtype)  # [E, b, H], [E, N, b]
    return a.reshape(-1, a.shape[-1]).contiguous(), b.permute(1, 0, 2).reshape(b.shape[1], -1).contiguous()


def union_lora_linear(y: torch.Tensor, x: torch.Tensor, union: UnionRows,
                      blocks: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
                      pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] | None, scale: float,
                      output_slices: Sequence[int], buffer_dtype: torch.dtype = torch.float32) -> None:
    """Mixture rows: y[r, oᵢ:oᵢ+nᵢ] += Σₑ w[r, e] · ((scale · x[r] @ Aₑᵢᵀ) in buffer_dtype, rounded to y.dtype) @ Bₑᵢᵀ.

    Every row gets its mixture Σₑ w[r, e] · sₑBₑAₑ x[r], exactly, whatever the number of distinct mixtures or
    experts in the step, in two parts (serving.fast_lora.segments.UnionRows):
    - union.blocks, K experts used by many rows: blocks[i] = (A `[K·b, H]`, B `[N, K·b]`) of slice i, the
      experts' blocks side by side; h = x[rows] @ Aᵀ `[t, K·b]`, block k scaled by w[:, k], then h @ Bᵀ;
    - union.pairs, G experts used by few rows: pairs[i] = (A `[G, b, H]`, B `[G, N, b]`); each (row, expert)
      pair multiplies its row by its expert's block alone (two bmm over the G experts), scaled by its weight.
    h is rounded to y.dtype before the expand, as vLLM's ops round their shrink buffer; the per-expert
    products are summed in ACCUMULATE and rounded to y.dtype once. y `[T, Σnᵢ]`, x `[T, H]`.
    """
    width = sum(output_slices)
    direct = y.dtype == torch.float32  # nothing to round: add every product straight into y
    out = None if direct else torch.zeros(union.count, width, dtype=torch.promote_types(y.dtype, ACCUMULATE))
    if union.blocks is not None:
        xg = _acc(_take(x, union.rows), buffer_dtype)  # [t, H]
        scales = union.blocks.weights.repeat_interleave(union.block_rank, dim=1)  # [t, K·b]
        if scale != 1.0:
            scales = scales * scale
        offset = 0
        for (a_union, b_union), n in zip(blocks, output_slices):
            h = (xg @ a_union.t()).mul_(scales)  # [t, K·b]
            if direct:
                _add_product(y[:, offset : offset + n], union.rows, h, b_union)
            else:
                out[:, offset : offset + n] = _acc(h, y.dtype) @ b_union.t()  # [t, n]
            offset += n
    if union.pairs is not None:
        p = union.pairs
        g = p.experts.numel()
        xp = _acc(x.index_select(0, p.rows), buffer_dtype).view(g, p.width, -1)  # [G, w, H]
        scales = (p.weights * scale).view(g, p.width, 1)  # [G, w, 1]; padding: 0
        offset = 0
        for (a, b), n in zip(pairs, output_slices):
            h = torch.bmm(xp, a.transpose(1, 2)).mul_(scales)  # [G, w, b]
            products = torch.bmm(_acc(h, y.dtype), b.transpose(1, 2)).view(-1, n)  # [G·w, n]
            if direct:
                y[:, offset : offset + n].index_add_(0, p.rows, products)
            else:
                out[:, offset : offset + n].index_add_(0, p.into, products)
            offset += n
    if out is not None:
        _put(y[:, :width], union.rows, out.to(y.dtype), add=True)


def _batched_lora_linear(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                         lora_b: Sequence[torch.Tensor], bt: Batched, scale: float, output_slices: Sequence[int],
                         buffer_dtype: torch.dtype) -> None:
    """grouped_lora_linear over all groups at once: gather rows [G, w, H], bmm with the G slots' weights, scatter."""
    g, w, width = bt.slots.numel(), bt.width, sum(output_slices)
    xp = _acc(x.index_select(0, bt.gather), buffer_dtype).view(g, w, -1)  # [G, w, H]
    out = torch.empty(g * w, width, dtype=torch.promote_types(y.dtype, ACCUMULATE))  # [G·w, N]
    offset = 0
    for a_stacked, b_stacked, n in zip(lora_a, lora_b, output_slices):
        s, h_in = a_stacked.shape[0], a_stacked.shape[-1]
        a_slots = a_stacked.reshape(s, -1, h_in)[:, : bt.rank]  # [S, r, H]: the groups' non-zero rows only
        b_slots = b_stacked.reshape(s, n, -1)[:, :, : bt.rank]  # [S, n, r]
        a = _acc(a_slots.index_select(0, bt.slots), buffer_dtype)  # [G, r, H]
        h = torch.bmm(xp, a.transpose(1, 2))  # [G, w, r]
        if scale != 1.0:
            h.mul_(scale)
        b = _acc(b_slots.index_select(0, bt.slots), y.dtype)  # [G, n, r]
        out[:, offset : offset + n] = torch.bmm(_acc(h, y.dtype), b.transpose(1, 2)).view(g * w, n)  # [G·w, n]
        offset += n
    delta = torch.zeros(y.shape[0] + 1, width, dtype=y.dtype)  # [T+1, N]; row T takes the padding
    delta.index_copy_(0, bt.scatter, out.to(y.dtype))
    y[:, :width].add_(delta[:-1])  # rows without an adapter add exactly 0


def grouped_lora_logits(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                        groups: Sequence[Group], scale: float, buffer_dtype: torch.dtype = torch.float32) -> None:
    """y[r, :n] += ((scale · x[r] @ A[s]ᵀ) in buffer_dtype) @ B[s][:n]ᵀ, n = min(V', V), one group per slot.

    y `[N, V]` logits, x `[N, H]` hidden states, lora_a `[S, 1, R, H]`, lora_b `[S, 1, V', R]`; rows are the
    sampled rows (vLLM's sampler indices), not the tokens. A slot whose A is all zero (an adapter without
    an lm_head LoRA, the usual case) adds exactly zero and is skipped.
    """
    for g in groups:
        a = _weight(lora_a, g.slot)  # [R, H]
        if not a.any():
            continue  # no lm_head LoRA in this slot: skip a [t, V] matmul of zeros
        b = _weight(lora_b, g.slot)  # [V', R]
        n = min(b.shape[0], y.shape[1])
        h = _mm(_take(x, g.rows), a, buffer_dtype)  # [t, R]
        if scale != 1.0:
            h.mul_(scale)
        _put(y[:, :n], g.rows, _mm(h, b[:n], y.dtype).to(y.dtype), add=True)  # [t, n]
