"""Unions of many experts and steps of many distinct mixtures: every (row, expert) pair in one batch, every
mixture row against a float64 loop over its experts.

Random steps: E experts (dense and sparse unions, with and without a shared last block) pinned in shuffled
slots, ordinary adapters and rows without one in between, mixtures of one or two routed experts (the gate's
top-2), each row's mixture drawn from M of them.
"""

from __future__ import annotations

import random

import pytest
import torch

from serving.fast_lora import ops, reference
from serving.fast_lora.mixture_ids import UnionLayout, encode, member_id
from serving.fast_lora.pairs import step_pairs

pytestmark = pytest.mark.vllm

BLOCK, RANK, HIDDEN, SLICES, GRID = 4, 8, 24, (16, 8), 20


def _step(experts: int, shared: bool, mixtures: int, rows: int, seed: int):
    """(lora_index_to_id, per-row LoRA ids (0: none), {mixture id: {block: weight}}, layout)."""
    rng = random.Random(seed)
    layout = UnionLayout.sized(seed % 100, experts, BLOCK, shared, GRID)
    routed = layout.routed
    mix = {}
    while len(mix) < mixtures:
        i, j = sorted(rng.sample(range(routed), 2))
        u = rng.randrange(0, GRID + 1)
        units = [0] * routed
        units[i], units[j] = u, GRID - u
        weights = {k: w / GRID for k, w in enumerate(units) if w}
        if shared:
            weights[experts - 1] = 1.0
        mix[encode(layout, units, GRID)] = weights
    ids = [member_id(layout, e) for e in range(experts)] + list(mix) + [11, 12]
    rng.shuffle(ids)
    choices = list(mix) * 3 + [11, 0]
    tokens = [rng.choice(choices) for _ in range(rows)]
    return ids, tokens, mix, layout


def _wrapper(ids, tokens):
    from vllm.lora.layers.utils import LoRAMapping

    from serving.fast_lora.wrapper import PunicaWrapperGrouped

    w = PunicaWrapperGrouped(4096, 256, "cpu")
    w.update_metadata(LoRAMapping(tuple(tokens), tuple(tokens), is_prefill=True), ids, len(ids) + 1, 64)
    return w


def _stacked(ids, layout, seed):
    """Random A [S, 1, R, H], B [S, 1, n, R]; members' rows past BLOCK zero, as in vLLM's padded slots."""
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(len(ids), 1, RANK, HIDDEN, generator=g) * 0.3 for _ in SLICES)
    b = tuple(torch.randn(len(ids), 1, n, RANK, generator=g) * 0.3 for n in SLICES)
    for e in range(layout.experts):
        slot = ids.index(member_id(layout, e))
        for t in a:
            t[slot, 0, BLOCK:] = 0
        for t in b:
            t[slot, 0, :, BLOCK:] = 0
    return a, b


def _expected(y0, x, a, b, ids, tokens, mix, layout, scale):
    slots = torch.tensor([ids.index(t) if t and t not in mix else -1 for t in tokens])
    out = reference.lora_linear(y0, x, a, b, slots, scale, SLICES)
    for row, lora_id in enumerate(tokens):
        if lora_id not in mix:
            continue
        offset = 0
        for a_s, b_s, n in zip(a, b, SLICES):
            for e, w in mix[lora_id].items():
                slot = ids.index(member_id(layout, e))
                out[row, offset : offset + n] += w * scale * (x[row].double() @ a_s[slot, 0].double().t()
                                                              @ b_s[slot, 0].double().t())
            offset += n
    return out


CASES = {  # experts, shared, distinct mixtures, rows
    "dense, few mixtures": (6, False, 2, 12),
    "dense, many mixtures": (16, False, 24, 48),
    "dense, shared": (17, True, 24, 48),
    "sparse, many mixtures": (300, False, 40, 64),
    "sparse, shared": (1023, True, 40, 64),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_every_mixture_row_gets_its_mixture(case, dtype, scale, layout):
    experts, shared, mixtures, rows = CASES[case]
    ids, tokens, mix, layout = _step(experts, shared, mixtures, rows, seed=len(case))
    wrapper = _wrapper(ids, tokens)
    a, b = _stacked(ids, layout, seed=1)
    a, b = tuple(w.to(dtype) for w in a), tuple(w.to(dtype) for w in b)
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(2)).to(dtype)
    y0 = torch.randn(rows, sum(SLICES), generator=torch.Generator().manual_seed(3)).to(dtype)
    y = y0.clone()
    wrapper.add_lora_linear(y, x, a, b, scale, SLICES)
    expected = _expected(y0, x, a, b, ids, tokens, mix, layout, scale).to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 3e-2}
    torch.testing.assert_close(y, expected, **tol)


def test_many_mixtures_read_only_the_experts_they_use(layout):
    rows_layout = layout
    ids, tokens, mix, layout = _step(1023, True, 40, 64, seed=5)
    wrapper = _wrapper(ids, tokens)
    table = wrapper.pairs.table()
    used = {e for t in tokens if t in mix for e in mix[t]}
    assert {slot for _, slot in table} == {ids.index(member_id(layout, e)) for e in used} | (
        {ids.index(11)} if 11 in tokens else set())
    assert len(table) == sum(len(mix[t]) for t in tokens if t in mix) + tokens.count(11)  # one pair per weight
    a, b = _stacked(ids, layout, seed=1)
    wrapper.add_lora_linear(torch.zeros(64, sum(SLICES)), torch.randn(64, HIDDEN), a, b, 1.0, SLICES)
    g = (wrapper.pairs.batch or wrapper.pairs.dense).slots.numel()
    if rows_layout.startswith("fused"):  # the kernel reads A, and B past GATHER_MAX_GROUPS slots, in place
        g = len({slot for _, slot in table})
        assert wrapper.pairs.flat.slots.numel() == g
        gathered = rows_layout == "fused" and g <= ops.GATHER_MAX_GROUPS  # B̂ᵀ [G, r, n] of the step's slots, only
        assert sorted(v[2].shape for v in wrapper.gathered.entries.values()) == (sorted(
            (g, wrapper.pairs.flat.rank or RANK, n) for n in SLICES) if gathered else [])
        return
    assert len(wrapper.gathered.entries) == 2 * len(SLICES)  # one gather of G experts per tensor, not of 1,023
    if rows_layout == "by_slot":  # [G, r, H] and [G, n, r]
        assert all(v[2].shape[0] == g for v in wrapper.gathered.entries.values())
    else:  # Âᵀ [H, G·r] and B̂ᵀ [G·r, n], r: the block rank, or all of a slot's rows with an ordinary adapter among them
        r = wrapper.pairs.dense.rank or RANK
        assert all(v[2].is_contiguous() for v in wrapper.gathered.entries.values())  # plain (NN) matmuls
        assert sorted(v[2].shape for v in wrapper.gathered.entries.values()) == sorted(
            [(HIDDEN, g * r)] * len(SLICES) + [(g * r, n) for n in SLICES])


def test_a_sparse_mixture_needs_only_its_own_experts_in_slots():
    layout = UnionLayout.sized(4, 500, BLOCK, grid_units=GRID)
    units = [0] * 500
    units[7], units[321] = 5, 15
    m = encode(layout, units, GRID)
    ids = [m, member_id(layout, 7), member_id(layout, 321), 11]  # 498 members not loaded
    pairs = step_pairs(torch.tensor([0, 3, 0]), ids)
    assert pairs.table() == {(0, 1): 0.25, (0, 2): 0.75, (2, 1): 0.25, (2, 2): 0.75, (1, 3): 1.0}
    assert pairs.mixture_rows == 2
    ids[2] = 12
    with pytest.raises(RuntimeError, match=r"experts \[321\] are not in a slot"):
        step_pairs(torch.tensor([0]), ids)


def test_rows_with_many_pairs_each_go_dense_and_others_by_slot():
    mixtures = _wrapper(*_step(6, False, 3, 16, seed=1)[:2]).pairs  # 16 rows over 3 mixtures of a few experts
    assert mixtures.dense is not None and (mixtures.loop, mixtures.batch) == ((), None)
    ids = [member_id(UnionLayout(1, 8, BLOCK), e) for e in range(8)]
    singles = step_pairs(torch.arange(16) % 8, ids)  # 16 rows over 8 experts, one pair each: 8 cells per pair
    assert singles.dense is None and singles.batch is not None
    many = _wrapper(*_step(1023, True, 40, 64, seed=5)[:2]).pairs  # 64 rows over dozens of experts
    assert many.dense is None and many.batch is not None
