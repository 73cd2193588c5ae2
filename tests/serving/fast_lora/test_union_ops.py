"""Mixture ids through the union: each mixture row gets Σₑ wₑ·sₑBₑAₑx, against a float64 loop.

A step mixes ordinary adapters, rows without an adapter, rows of an expert used alone and rows
of three different mixture ids, whose own slots hold placeholders (random here, so that reading
them would show); the E experts of the union sit in slots of their own, out of order, under
their member ids, with rank BLOCK padded to the slots' RANK; expert 1 has rank SMALL < BLOCK (a union of
mixed ranks: its block ends in zero rows, as vLLM's reset slots hold them).
"""

from __future__ import annotations

import pytest
import torch

from serving.fast_lora import reference
from serving.fast_lora.mixture_ids import UnionLayout, encode, member_id
from serving.fast_lora.segments import mixture_slots, split_union_rows

pytestmark = pytest.mark.vllm

E, BLOCK, SMALL = 3, 4, 2
RANK = 16  # max_lora_rank; the experts use BLOCK of it
HIDDEN = 32
SLICES = (24, 8, 8)
LAYOUT = UnionLayout(family=9, experts=E, block_rank=BLOCK)
X0, X1, X2 = (member_id(LAYOUT, e) for e in range(E))
MIX = {  # lora id -> weights per expert
    encode(LAYOUT, [1, 1, 0], 2): (0.5, 0.5, 0.0),
    encode(LAYOUT, [0, 13, 7], 20): (0.0, 0.65, 0.35),
    encode(LAYOUT, [0, 0, 5], 5): (0.0, 0.0, 1.0),
}
M1, M2, M3 = MIX
IDS = [11, M1, X2, M2, X0, 12, M3, X1]  # lora_index_to_id: slot -> LoRA id
STEPS = {  # per-token LoRA ids (0: none), per-request ids (sampled rows)
    "prefill": ([M1] * 4 + [11] * 3 + [0] * 2 + [M2] * 5 + [X1] * 2 + [M1] * 2, [M1, 11, 0, M2, X1, M1]),
    "decode": ([M1, 11, M2, 0, M3, 12, M2, X0, M1], [M1, 11, M2, 0, M3, 12, M2, X0, M1]),
    "mixtures_only": ([M3, M2, M1, M3], [M3, M2, M1, M3]),
    "some_experts": ([M1, 11, M1, 0, M1], [M1, 11, M1, 0, M1]),  # M1 uses experts 0 and 1 only
    "one_expert_mixture": ([M3, 12, M3], [M3, 12, M3]),  # M3 is expert 2 at weight 1
    "no_mixture": ([11, 12, 0, 11], [11, 12, 0, 11]),
    "members_only": ([X0, X1, X2, X0, 0, X1], [X0, X1, X2, X0, 0, X1]),  # batched over the members' BLOCK rows
}


def _wrapper(step: str):
    from vllm.lora.layers.utils import LoRAMapping

    from serving.fast_lora.wrapper import PunicaWrapperGrouped

    tokens, prompts = STEPS[step]
    w = PunicaWrapperGrouped(256, 16, "cpu")
    w.update_metadata(LoRAMapping(tuple(tokens), tuple(prompts), is_prefill=True), IDS, len(IDS) + 1, 64)
    return w, len(tokens)


def _stacked(seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Random A [S, 1, R, H] and B [S, 1, n, R] per slice; the members' rows past BLOCK are zero (padding)."""
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(len(IDS), 1, RANK, HIDDEN, generator=g) * 0.3 for _ in SLICES)
    b = tuple(torch.randn(len(IDS), 1, n, RANK, generator=g) * 0.3 for n in SLICES)
    for slot in (IDS.index(X0), IDS.index(X1), IDS.index(X2)):
        for t in a:
            t[slot, 0, BLOCK:] = 0
        for t in b:
            t[slot, 0, :, BLOCK:] = 0
    for t in a:
        t[IDS.index(X1), 0, SMALL:] = 0
    for t in b:
        t[IDS.index(X1), 0, :, SMALL:] = 0
    return a, b


def _expected(y0, x, a, b, tokens, scale):
    """Ordinary rows by the plain reference; mixture rows as Σₑ wₑ · scale · x Aₑᵀ Bₑᵀ over the members' slots."""
    slots = torch.tensor([IDS.index(t) if t and t not in MIX else -1 for t in tokens])
    out = reference.lora_linear(y0, x, a, b, slots, scale, SLICES)
    members = [IDS.index(m) for m in (X0, X1, X2)]
    for row, lora_id in enumerate(tokens):
        if lora_id not in MIX:
            continue
        offset = 0
        for a_s, b_s, n in zip(a, b, SLICES):
            for e, w in enumerate(MIX[lora_id]):
                a_e, b_e = a_s[members[e], 0].double(), b_s[members[e], 0].double()
                out[row, offset : offset + n] += w * scale * (x[row].double() @ a_e.t() @ b_e.t())
            offset += n
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_mixture_rows_get_their_mixture_of_the_union(step, dtype, scale):
    wrapper, t = _wrapper(step)
    a, b = _stacked(seed=1)
    a, b = tuple(w.to(dtype) for w in a), tuple(w.to(dtype) for w in b)
    x = torch.randn(t, HIDDEN, generator=torch.Generator().manual_seed(2)).to(dtype)
    y0 = torch.randn(t, sum(SLICES), generator=torch.Generator().manual_seed(3)).to(dtype)
    y = y0.clone()
    wrapper.add_lora_linear(y, x, a, b, scale, SLICES)
    expected = _expected(y0, x, a, b, STEPS[step][0], scale).to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 3e-2}
    torch.testing.assert_close(y, expected, **tol)
    assert (wrapper.union_rows is None) == (step in ("no_mixture", "members_only"))


def test_union_rows_carry_each_rows_weights():
    wrapper, _ = _wrapper("decode")
    union = wrapper.union_rows
    assert union.block_rank == BLOCK and union.count == 5
    assert torch.equal(union.rows, torch.tensor([0, 2, 4, 6, 8]))
    expected = torch.tensor([MIX[M1], MIX[M2], MIX[M3], MIX[M2], MIX[M1]], dtype=torch.float32)
    torch.testing.assert_close(union.blocks.weights, expected)
    assert all(g.slot not in (IDS.index(M1), IDS.index(M2), IDS.index(M3)) for g in wrapper.token_groups)
    assert union.blocks.complete and union.blocks.slots == (4, 7, 2) and union.pairs is None  # all three used


def test_member_slots_are_multiplied_by_their_block_rank_only():
    wrapper, _ = _wrapper("members_only")
    assert {g.slot: g.rank for g in wrapper.token_groups} == {IDS.index(X0): BLOCK, IDS.index(X1): BLOCK,
                                                              IDS.index(X2): BLOCK}
    assert wrapper.token_batched is not None and wrapper.token_batched.rank == BLOCK
    wrapper, _ = _wrapper("decode")  # an ordinary adapter among the groups: the batch keeps every row
    assert wrapper.token_batched.rank is None and {g.rank for g in wrapper.token_groups} == {None, BLOCK}


def test_a_step_that_uses_some_experts_multiplies_by_their_blocks_only():
    wrapper, _ = _wrapper("some_experts")
    blocks = wrapper.union_rows.blocks
    assert torch.equal(blocks.experts, torch.tensor([0, 1])) and not blocks.complete
    torch.testing.assert_close(blocks.weights, torch.tensor([[0.5, 0.5]] * 3))
    wrapper, _ = _wrapper("one_expert_mixture")
    assert torch.equal(wrapper.union_rows.blocks.experts, torch.tensor([2]))


def test_a_mixture_without_all_its_experts_in_slots_is_an_error():
    ids = [11, M1, X0, X2, None]
    with pytest.raises(RuntimeError, match=r"experts \[1\] are not in a slot"):
        split_union_rows(torch.tensor([1, 0, 1]), ids, mixture_slots(ids))


def test_mixtures_of_two_unions_in_one_step_are_an_error():
    other = UnionLayout(family=10, experts=E, block_rank=BLOCK)
    ids = [M1, encode(other, [1, 1, 0], 2), X0, X1, X2, *(member_id(other, e) for e in range(E))]
    with pytest.raises(RuntimeError, match="different unions"):
        split_union_rows(torch.tensor([0, 1]), ids, mixture_slots(ids))


def test_unfused_ops_refuse_mixture_rows():
    wrapper, t = _wrapper("decode")
    a, _ = _stacked(seed=1)
    with pytest.raises(NotImplementedError, match="union"):
        wrapper.add_shrink(torch.zeros(3, t, RANK), torch.randn(t, HIDDEN), a, 1.0)


def test_logits_of_mixture_rows_ignore_the_placeholder_slots():
    wrapper, _ = _wrapper("decode")
    prompts = STEPS["decode"][1]
    g = torch.Generator().manual_seed(4)
    a = torch.randn(len(IDS), 1, RANK, HIDDEN, generator=g)  # every slot, placeholders included, non-zero
    b = torch.randn(len(IDS), 1, 40, RANK, generator=g)
    x = torch.randn(len(prompts), HIDDEN, generator=g)
    y0 = torch.randn(len(prompts), 40, generator=g)
    y = y0.clone()
    wrapper.add_lora_logits(y, x, a, b, 1.0)
    slots = torch.tensor([IDS.index(p) if p and p not in MIX else -1 for p in prompts])
    torch.testing.assert_close(y, reference.lora_linear(y0, x, (a,), (b,), slots, 1.0, (40,)).float())


def test_the_union_is_assembled_once_per_layer_and_rebuilt_when_members_move():
    wrapper, t = _wrapper("decode")
    a, b = _stacked(seed=1)
    x = torch.randn(t, HIDDEN, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(t, sum(SLICES))
    wrapper.add_lora_linear(y, x, a, b, 1.0, SLICES)
    wrapper.add_lora_linear(y, x, a, b, 1.0, SLICES)
    assert len(wrapper.union_cache) == len(SLICES)
    from vllm.lora.layers.utils import LoRAMapping

    moved = [11, M1, X1, M2, X0, 12, M3, X2]  # X1 and X2 swapped slots
    wrapper.update_metadata(LoRAMapping((M1, M2), (M1, M2), is_prefill=True), moved, len(moved) + 1, 64)
    y0 = torch.zeros(2, sum(SLICES))
    y = y0.clone()
    wrapper.add_lora_linear(y, x[:2], a, b, 1.0, SLICES)
    assert len(wrapper.union_cache) == len(SLICES) and all(k[2] == (4, 2, 7) for k in wrapper.union_cache)
