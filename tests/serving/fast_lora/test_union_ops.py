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
from serving.fast_lora.pairs import step_pairs

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
    "runs": ([M2] * 17 + [11] * 16 + [M1, X0, 12] + [M3] * 20, [M2, 11, M1, X0, 12, M3]),  # prefill chunks
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


def _expected(y0, x, a, b, tokens, scale, ids=IDS):
    """Ordinary rows by the plain reference; mixture rows as Σₑ wₑ · scale · x Aₑᵀ Bₑᵀ over the members' slots."""
    slots = torch.tensor([ids.index(t) if t and t not in MIX else -1 for t in tokens])
    out = reference.lora_linear(y0, x, a, b, slots, scale, SLICES)
    members = [ids.index(m) for m in (X0, X1, X2)]
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
def test_mixture_rows_get_their_mixture_of_the_union(step, dtype, scale, layout):
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
    assert (wrapper.pairs.mixture_rows == 0) == (step in ("no_mixture", "members_only"))


def _expected_pairs(step: str) -> dict[tuple[int, int], float]:
    """(row, slot) -> weight that each row of the step should ask for."""
    members = [IDS.index(m) for m in (X0, X1, X2)]
    out = {}
    for row, lora_id in enumerate(STEPS[step][0]):
        if lora_id in MIX:
            out.update({(row, members[e]): w for e, w in enumerate(MIX[lora_id]) if w})
        elif lora_id:
            out[(row, IDS.index(lora_id))] = 1.0
    return out


@pytest.mark.parametrize("step", list(STEPS))
def test_each_row_asks_for_its_adapter_or_its_mixtures_experts(step, layout):
    wrapper, _ = _wrapper(step)
    table = wrapper.pairs.table()
    assert table == pytest.approx(_expected_pairs(step))
    placeholders = {IDS.index(m) for m in MIX}
    assert not {slot for _, slot in table} & placeholders  # a mixture id's own slot is never read
    assert wrapper.pairs.pairs == len(table)


def test_contiguous_rows_on_one_id_are_runs_with_their_experts_side_by_side():
    wrapper, _ = _wrapper("runs")
    runs = wrapper.pairs.runs
    assert [(r.rows, [p.slot for p in r.parts]) for r in runs] == [
        (slice(0, 17), [IDS.index(X1), IDS.index(X2)]), (slice(17, 33), [IDS.index(11)]),
        (slice(36, 56), [IDS.index(X2)])]
    torch.testing.assert_close(runs[0].scales, torch.tensor([0.65] * BLOCK + [0.35] * BLOCK))
    assert runs[1].scales is None and runs[2].scales is None and runs[2].parts[0].weight == 1.0
    assert wrapper.pairs.table().keys() >= {(33, IDS.index(X0)), (34, IDS.index(X0)), (35, IDS.index(12))}


def test_member_slots_are_multiplied_by_their_block_rank_only(layout):
    def rest(step):  # the layout of the rows outside runs
        wrapper, _ = _wrapper(step)
        return {"by_slot": wrapper.pairs.batch, "dense": wrapper.pairs.dense, "fused": wrapper.pairs.flat, "fused_in_place": wrapper.pairs.flat}[layout]

    assert rest("members_only").rank == BLOCK
    assert rest("decode").rank is None  # an ordinary adapter among the slots: every row of the slots is kept


def test_a_step_that_uses_some_experts_reads_their_slots_only():
    wrapper, _ = _wrapper("some_experts")
    assert {slot for _, slot in wrapper.pairs.table()} == {IDS.index(X0), IDS.index(X1), IDS.index(11)}
    wrapper, _ = _wrapper("one_expert_mixture")
    assert {slot for _, slot in wrapper.pairs.table()} == {IDS.index(X2), IDS.index(12)}


def test_a_mixture_without_all_its_experts_in_slots_is_an_error():
    ids = [11, M1, X0, X2, None]
    with pytest.raises(RuntimeError, match=r"experts \[1\] are not in a slot"):
        step_pairs(torch.tensor([1, 0, 1]), ids)


def test_mixtures_of_two_unions_in_one_step_are_an_error():
    other = UnionLayout(family=10, experts=E, block_rank=BLOCK)
    ids = [M1, encode(other, [1, 1, 0], 2), X0, X1, X2, *(member_id(other, e) for e in range(E))]
    with pytest.raises(RuntimeError, match="different unions"):
        step_pairs(torch.tensor([0, 1]), ids)


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


def test_gathered_weights_are_reused_until_a_slot_is_written_or_members_move(layout):
    from vllm.lora.layers.utils import LoRAMapping

    wrapper, t = _wrapper("decode")
    a, b = _stacked(seed=1)
    x = torch.randn(t, HIDDEN, generator=torch.Generator().manual_seed(2))
    tokens = STEPS["decode"][0]

    def check(ids, tokens, a, b):
        y0 = torch.zeros(len(tokens), sum(SLICES))
        y = y0.clone()
        wrapper.add_lora_linear(y, x[: len(tokens)], a, b, 1.0, SLICES)
        torch.testing.assert_close(y, _expected(y0, x[: len(tokens)], a, b, tokens, 1.0, ids).float())

    check(IDS, tokens, a, b)
    held = dict(wrapper.gathered.entries)
    check(IDS, tokens, a, b)
    assert bool(held) == (layout != "fused_in_place")  # the kernel reading B in place gathers nothing
    assert wrapper.gathered.entries.keys() == held.keys()
    assert all(wrapper.gathered.entries[k][2] is v[2] for k, v in held.items())  # the same gathers: hits
    a[0][IDS.index(X0), 0] += 1.0  # vLLM loads another adapter into a slot in place
    check(IDS, tokens, a, b)
    moved = [11, M1, X1, M2, X0, 12, M3, X2]  # X1 and X2 swapped slots
    wrapper.update_metadata(LoRAMapping((M1, M2, X1, 0), (M1, M2, X1, 0), is_prefill=True), moved,
                            len(moved) + 1, 64)
    for t_ in (a[0], a[1], a[2], b[0], b[1], b[2]):  # the same tensors, with the members' weights moved too
        t_[[7, 2]] = t_[[2, 7]].clone()
    check(moved, [M1, M2, X1, 0], a, b)


def test_the_cache_holds_at_most_its_bytes():
    from serving.fast_lora.gather_cache import GatherCache

    cache = GatherCache(max_bytes=3 * 4 * 10)
    t = torch.zeros(8, 10)
    for k in range(5):
        cache.get(t, (k,), lambda k=k: t[k].clone())
    assert cache.bytes <= cache.max_bytes and [key for _, key in cache.entries] == [(2,), (3,), (4,)]
    assert cache.get(t, (4,), lambda: None) is cache.entries[(t.data_ptr(), (4,))][2]  # a hit
    alias = t.view(8, 10)  # another tensor at the same address, with the same version counter
    assert alias.data_ptr() == t.data_ptr() and alias._version == t._version
    assert cache.get(alias, (4,), lambda: alias[0] + 1).sum() == 10  # never another tensor's gather
