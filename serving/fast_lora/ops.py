"""Grouped LoRA ops: the step's rows multiplied by the slots they use, never one copy of the weights per token.

vLLM's CPU ops (vllm/lora/ops/torch_ops) gather a private copy of the adapter weights for
every token (`w[indices]`: [T, out, in]) and multiply with a batched einsum. Here the linear
layers take the step's (row, slot, weight) pairs (serving.fast_lora.pairs; `pair_lora_linear`):
runs of rows on one adapter or mixture multiply against their slots' weights in place, the other
pairs in one batched matmul pair over the slots they use. The embedding and logits layers take
the step's groups (slot s, rows r; serving.fast_lora.segments): `x[r] @ Aₛᵀ` then `@ Bₛᵀ` per
group. Rows with no adapter (slot -1) are not touched.

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
from functools import partial

import torch

from serving.fast_lora import native
from serving.fast_lora.gather_cache import GatherCache, cached
from serving.fast_lora.pairs import DenseRows, FlatPairs, PairBatch, Run, StepPairs
from serving.fast_lora.segments import Group, Rows

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


def _add_rows(y: torch.Tensor, rows: torch.Tensor, products: Sequence[torch.Tensor]) -> None:
    """y[rows[p], :Σnᵢ] += the products side by side (products[i] `[P, nᵢ]`): one index_add_ of one contiguous block.

    index_add_ into a column slice of y (strided rows) runs ~8x slower on CPU than into whole rows, so the slices'
    products are laid side by side first (one copy of P·Σnᵢ) and added in one call."""
    block = products[0] if len(products) == 1 else torch.cat(products, dim=1)  # [P, Σnᵢ]
    target = y if block.shape[1] == y.shape[1] else y[:, : block.shape[1]]
    target.index_add_(0, rows, block)


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


WIDE_BATCH = 8
"""From this many pairs per slot on, the batch's shrink runs as A x̂ᵀ (measured faster on CPU than x̂ Aᵀ there)."""


def pair_lora_linear(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                     lora_b: Sequence[torch.Tensor], pairs: StepPairs, scale: float, output_slices: Sequence[int],
                     buffer_dtype: torch.dtype = torch.float32, cache: GatherCache | None = None) -> None:
    """y[r, oᵢ:oᵢ+nᵢ] += Σ over r's pairs (s, w): w · ((scale · x[r] @ Aᵢ[s]ᵀ) in buffer_dtype, rounded to y.dtype)
    @ Bᵢ[s]ᵀ, for each slice i; oᵢ = n₀ + … + nᵢ₋₁ (serving.fast_lora.pairs).

    y `[T, Σnᵢ]`, x `[T, H]`, lora_a[i] `[S, 1, R, H]`, lora_b[i] `[S, 1, nᵢ, R]`. A row's products are summed in
    ACCUMULATE and rounded to y.dtype once (float32 y: added straight into y). Rows without pairs are untouched.
    `pairs.runs` multiply their slice of rows by their parts' blocks side by side; `pairs.dense` multiplies its
    rows by its G slots' blocks side by side (transposed: `[H, G·r]`, `[G·r, nᵢ]`, kept in `cache` between
    steps); `pairs.loop` slots multiply on the slot's weights in place; `pairs.batch` gathers its G slots' weights
    `[G, r, H]`, `[G, nᵢ, r]` (kept in `cache`) and runs one bmm pair per slice over all positions. In float32,
    and in bfloat16 steps with a mixture row, `pairs.flat` replaces those three and the short runs with one call
    of the fused kernel (serving.fast_lora.native) when it is built; the long runs (`pairs.flat_runs`) stay
    matmuls.
    """
    if _fused_lora_linear(y, x, lora_a, lora_b, pairs, scale, output_slices, buffer_dtype, cache):
        return
    width = sum(output_slices)
    direct = y.dtype == torch.float32  # nothing to round: add every product straight into y
    acc = y if direct else torch.zeros(y.shape[0], width, dtype=ACCUMULATE)  # [T, N]
    for run in pairs.runs:
        _run_lora_linear(acc, x, lora_a, lora_b, run, scale, output_slices, buffer_dtype, y.dtype, cache)
    if pairs.dense is not None:
        _dense_lora_linear(acc, x, lora_a, lora_b, pairs.dense, scale, output_slices, buffer_dtype, y.dtype, cache)
    for g in pairs.loop:
        xg = _acc(_take(x, g.rows), buffer_dtype)  # [t, H]
        offset, products = 0, []
        for a_stacked, b_stacked, n in zip(lora_a, lora_b, output_slices):
            h = xg @ _acc(_a(a_stacked, g), buffer_dtype).t()  # [t, r]
            if scale != 1.0:
                h.mul_(scale)
            if g.weights is not None:
                h.mul_(g.weights)
            h, b = _acc(h, y.dtype), _acc(_b(b_stacked, g), y.dtype)  # [t, r], [n, r]
            if isinstance(g.rows, slice):
                acc[g.rows, offset : offset + n].addmm_(h, b.t())
            else:
                products.append(h @ b.t())  # [t, n]
            offset += n
        if products:
            _add_rows(acc, g.rows, products)
    bt = pairs.batch
    if bt is not None:
        g = bt.slots.numel()
        xp = _acc(x.index_select(0, bt.rows), buffer_dtype).view(g, bt.width, -1)  # [G, w, H]
        wide = bt.width >= WIDE_BATCH
        weights = None if bt.weights is None else bt.weights.view(g, 1, bt.width) if wide else \
            bt.weights.view(g, bt.width, 1)  # [G, 1, w] or [G, w, 1]
        products = []
        for a_stacked, b_stacked, n in zip(lora_a, lora_b, output_slices):
            a = _acc(cached(cache, a_stacked, ("batch", bt.key), partial(_gather_a, a_stacked, bt)), buffer_dtype)
            # [G, r, H]; h: [G, w, r] (wide: computed as its transpose A x̂ᵀ [G, r, w], which runs faster there)
            h = torch.bmm(a, xp.transpose(1, 2)) if wide else torch.bmm(xp, a.transpose(1, 2))
            if scale != 1.0:
                h.mul_(scale)
            if weights is not None:
                h.mul_(weights)
            h = _acc(h.transpose(1, 2) if wide else h, y.dtype)  # [G, w, r]
            b = cached(cache, b_stacked, ("batch", bt.key), partial(_gather_b, b_stacked, bt))  # [G, n, r]
            products.append(torch.bmm(h, _acc(b, y.dtype).transpose(1, 2)).view(-1, n))  # [G·w, n]
        _add_rows(acc, bt.rows, products)
    if not direct:
        y[:, :width].add_(acc.to(y.dtype))  # rows without pairs add exactly 0


def _fusable(y: torch.Tensor, x: torch.Tensor, tensors: Sequence[torch.Tensor], buffer_dtype: torch.dtype) -> bool:
    """Whether the fused kernel computes what the torch layouts would: weights, x and y all float32 (every product
    added straight into y), or all bfloat16 (the products summed in float32, h rounded to bfloat16 before the
    expand and the sum once into y, as the torch layouts do); the weights laid out row by row."""
    dtype = y.dtype
    return (buffer_dtype == torch.float32 and dtype in (torch.float32, torch.bfloat16) and x.dtype == dtype
            and y.stride(-1) == 1 and all(t.dtype == dtype and t.stride(-1) == 1 for t in tensors))


def _flat_b_t(stacked: torch.Tensor, flat: FlatPairs) -> torch.Tensor:
    """The flat groups' B blocks transposed, `[G, r, n]` contiguous (r = flat.rank, all R when None)."""
    return _gather_b(stacked, flat).transpose(1, 2).contiguous()


GATHER_MAX_GROUPS = 32
"""Float32 steps with at most this many flat groups (slots) give the kernel their B blocks gathered and
transposed, kept in the gather cache from step to step (a gate over tens of experts uses the same slots step after
step); past it, and always in bfloat16, the kernel reads B in place and transposes one slot's block at a time:
nothing to allocate, cache or evict when the step's slots change every step (a gate over a thousand experts)."""


def _fused_lora_linear(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                       lora_b: Sequence[torch.Tensor], pairs: StepPairs, scale: float, output_slices: Sequence[int],
                       buffer_dtype: torch.dtype, cache: GatherCache | None) -> bool:
    """y[rows[p], oᵢ:oᵢ+nᵢ] += (scale · weights[p] · x[rows[p]] @ Aᵢ[s]ᵀ) @ Bᵢ[s]ᵀ for every flat pair p of group
    (slot s), in one call of the fused kernel, then the long runs (`pairs.flat_runs`) as matmuls. In bfloat16 the
    products are summed in float32 (h rounded to bfloat16 before the expand) and the sum rounded into y once, as
    the torch layouts do; only steps with a mixture row go there, so that steps of one adapter per row keep vLLM's
    own sums (tests/serving/fast_lora/test_greedy_equivalence.py). Returns False, having done nothing, when there
    are no flat pairs or the kernel cannot compute them (another dtype, not built): the torch layouts serve them."""
    flat = pairs.flat
    if flat is None or not _fusable(y, x, [*lora_a, *lora_b], buffer_dtype):
        return False
    direct = y.dtype == torch.float32
    if not direct and pairs.mixture_rows == 0:
        return False
    fused = native.kernel()
    if fused is None:
        return False
    width = sum(output_slices)
    acc = y if direct else torch.zeros(y.shape[0], width, dtype=ACCUMULATE)  # [T, N]
    x32 = x.to(ACCUMULATE)  # [T, H]
    x32 = x32 if x32.stride(-1) == 1 else x32.contiguous()
    in_place = not direct or flat.slots.numel() > GATHER_MAX_GROUPS
    bs = list(lora_b) if in_place else [cached(cache, b, ("flat", flat.key), partial(_flat_b_t, b, flat))
                                        for b in lora_b]  # stacked [S, 1, nᵢ, R], or gathered [G, r, nᵢ]
    fused.pair_lora(acc, x32, list(lora_a), bs, flat.slots, flat.starts, flat.ranks, flat.rows, flat.weights,
                    float(scale), in_place, not direct)
    for run in pairs.flat_runs:
        _run_lora_linear(acc, x, lora_a, lora_b, run, scale, output_slices, buffer_dtype, y.dtype, cache)
    if not direct:
        y[:, :width].add_(acc.to(y.dtype))  # rows without pairs add exactly 0
    return True


def _gather_a(stacked: torch.Tensor, bt: PairBatch | DenseRows) -> torch.Tensor:
    """The slots' A, `[G, r, H]`, from A `[S, 1, R, H]` (r = bt.rank, all R when None)."""
    s, h = stacked.shape[0], stacked.shape[-1]
    return stacked.reshape(s, -1, h)[:, : bt.rank].index_select(0, bt.slots)


def _gather_b(stacked: torch.Tensor, bt: PairBatch | DenseRows | FlatPairs) -> torch.Tensor:
    """The slots' B, `[G, n, r]`, from B `[S, 1, n, R]`."""
    s, n = stacked.shape[0], stacked.shape[-2]
    return stacked.reshape(s, n, -1)[:, :, : bt.rank].index_select(0, bt.slots)


# The dense gathers are kept transposed and contiguous, so that its products are plain (NN) matmuls
# x @ Âᵀ and h @ B̂ᵀ: for a decode step's few rows, a matmul on a transposed view (NT) read the weights
# ~1.5x slower than the NN one on the same bytes (16 rows, rank 80, H 576-1536, an Intel Xeon, one thread).


def _dense_a_t(stacked: torch.Tensor, d: DenseRows, rounded_to: torch.dtype) -> torch.Tensor:
    """The dense slots' A blocks stacked, transposed: `[H, G·r]` = [A₁; …; A_G]ᵀ contiguous, rounded to
    `rounded_to` and held in ACCUMULATE."""
    return _acc(_gather_a(stacked, d).flatten(0, 1).t(), rounded_to).contiguous()


def _dense_b_t(stacked: torch.Tensor, d: DenseRows, rounded_to: torch.dtype) -> torch.Tensor:
    """The dense slots' B blocks side by side, transposed: `[G·r, n]` = [B₁ … B_G]ᵀ contiguous, rounded to
    `rounded_to` and held in ACCUMULATE."""
    return _acc(_gather_b(stacked, d).transpose(1, 2).flatten(0, 1), rounded_to).contiguous()


def _dense_lora_linear(acc: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                       lora_b: Sequence[torch.Tensor], d: DenseRows, scale: float, output_slices: Sequence[int],
                       buffer_dtype: torch.dtype, y_dtype: torch.dtype, cache: GatherCache | None) -> None:
    """acc[rows, oᵢ:oᵢ+nᵢ] += ((scale · x[rows] @ Âᵢᵀ) ⊙ (W ⊗ 1ᵣ)) @ B̂ᵢᵀ, h rounded to y_dtype before the expand;
    Âᵢ = [Aᵢ[s₁]; …; Aᵢ[s_G]] `[G·r, H]`, B̂ᵢ = [Bᵢ[s₁] … Bᵢ[s_G]] `[nᵢ, G·r]`, W = d.weights `[t, G]`."""
    xr = _acc(_take(x, d.rows), buffer_dtype)  # [t, H]
    t, g = d.weights.shape
    weights = (d.weights if scale == 1.0 else d.weights * scale).unsqueeze(2)  # [t, G, 1]
    offset, products = 0, []
    for a_stacked, b_stacked, n in zip(lora_a, lora_b, output_slices):
        a_t = cached(cache, a_stacked, ("dense", d.key, buffer_dtype),
                     partial(_dense_a_t, a_stacked, d, buffer_dtype))  # [H, G·r]
        b_t = cached(cache, b_stacked, ("dense", d.key, y_dtype), partial(_dense_b_t, b_stacked, d, y_dtype))
        h = xr @ a_t  # [t, G·r]
        h.view(t, g, -1).mul_(weights)
        h = _acc(h, y_dtype)
        if isinstance(d.rows, slice):
            acc[d.rows, offset : offset + n].addmm_(h, b_t)  # [t, n]
        else:
            products.append(h @ b_t)  # [t, n]
        offset += n
    if products:
        _add_rows(acc, d.rows, products)


def _side_by_side_a(stacked: torch.Tensor, run: Run) -> torch.Tensor:
    """The run's parts' A blocks stacked, `[Σr, H]`."""
    return torch.cat([_a(stacked, p) for p in run.parts])


def _side_by_side_b(stacked: torch.Tensor, run: Run) -> torch.Tensor:
    """The run's parts' B blocks side by side, `[n, Σr]`."""
    return torch.cat([_b(stacked, p) for p in run.parts], dim=1)


def _run_lora_linear(acc: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                     lora_b: Sequence[torch.Tensor], run: Run, scale: float, output_slices: Sequence[int],
                     buffer_dtype: torch.dtype, y_dtype: torch.dtype, cache: GatherCache | None) -> None:
    """acc[rows, oᵢ:oᵢ+nᵢ] += (scale · x[rows] @ [Aᵢ[s₁]; …; Aᵢ[sₖ]]ᵀ ⊙ run.scales) @ [Bᵢ[s₁] … Bᵢ[sₖ]]ᵀ; h rounded
    to y_dtype before the expand. One part: the slot's weights as views, scaled by its weight."""
    xr = _acc(x[run.rows], buffer_dtype)  # [t, H]
    slots = tuple((p.slot, p.rank) for p in run.parts)
    offset = 0
    for a_stacked, b_stacked, n in zip(lora_a, lora_b, output_slices):
        if run.scales is None:
            a, b = _a(a_stacked, run.parts[0]), _b(b_stacked, run.parts[0])  # [r, H], [n, r]
        else:  # [Σr, H], [n, Σr]
            a = cached(cache, a_stacked, ("run", slots), partial(_side_by_side_a, a_stacked, run))
            b = cached(cache, b_stacked, ("run", slots), partial(_side_by_side_b, b_stacked, run))
        h = xr @ _acc(a, buffer_dtype).t()  # [t, Σr]
        if run.scales is not None:
            h.mul_(run.scales)
        factor = scale * (run.parts[0].weight if run.scales is None else 1.0)
        if factor != 1.0:
            h.mul_(factor)
        acc[run.rows, offset : offset + n].addmm_(_acc(h, y_dtype), _acc(b, y_dtype).t())
        offset += n


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
