"""Mixture ids: every encodable weight vector round-trips, and nothing else is taken for a mixture."""

from __future__ import annotations

import itertools
from math import comb

import pytest

from serving.adapter_resolver import stable_lora_id
from serving.fast_lora import mixture_ids
from serving.fast_lora.mixture_ids import MemberCode, MixtureCode, UnionLayout, decode, encode, member_id


@pytest.mark.parametrize("experts,n,shared", [(1, 1, False), (3, 4, False), (4, 5, False), (10, 2, False),
                                              (2, 1, True), (4, 5, True), (11, 2, True)])
def test_every_composition_round_trips_to_a_distinct_dense_code(experts, n, shared):
    layout = UnionLayout(family=120, experts=experts, block_rank=8, shared=shared)
    routed = experts - shared
    codes = set()
    for units in itertools.product(range(n + 1), repeat=routed):
        if sum(units) != n:
            continue
        lora_id = encode(layout, units, n)
        assert lora_id is not None and 0 < lora_id < 1 << 63
        code = decode(lora_id)
        assert isinstance(code, MixtureCode) and (code.layout, code.units, code.n) == (layout, tuple(units), n)
        codes.add(lora_id & ((1 << 32) - 1))
    assert codes == set(range(comb(n + routed - 1, routed - 1)))  # dense: ranks 0 .. C-1


def test_a_shared_union_weighs_its_last_block_1_under_every_mixture():
    shared, plain = UnionLayout(7, 11, 8, shared=True), UnionLayout(7, 11, 8)
    code = decode(encode(shared, [0, 0, 13, 0, 0, 0, 0, 7, 0, 0], 20))
    assert code.layout == shared and code.weights == (0, 0, 0.65, 0, 0, 0, 0, 0.35, 0, 0, 1.0)
    assert encode(shared, [0] * 9 + [20], 20) != encode(plain, [0] * 9 + [20, 0], 20)
    assert encode(shared, [20] + [0] * 10, 20) is None  # 11 weights: the shared block is not weighed
    assert decode(member_id(shared, 10)) == MemberCode(shared, 10)  # the shared adapter, pinned like any member
    assert member_id(shared, 3) != member_id(plain, 3)
    with pytest.raises(ValueError):
        UnionLayout(7, 1, 8, shared=True)  # a shared block and nothing to route


def test_the_default_bundles_gate_mixtures_fit():
    layout = UnionLayout(family=7, experts=10, block_rank=8)
    code = decode(encode(layout, [0, 0, 13, 0, 0, 0, 0, 7, 0, 0], 20))
    assert code.weights == (0, 0, 0.65, 0, 0, 0, 0, 0.35, 0, 0)
    assert [decode(member_id(layout, i)) for i in range(10)] == [MemberCode(layout, i) for i in range(10)]
    with pytest.raises(ValueError):
        member_id(layout, 10)


@pytest.mark.parametrize("units,n", [([1, -1, 5], 5), ([1, 1, 1], 5), ([5, 0], 5), ([0, 0, 0], 0), ([200, 0, 0], 200)])
def test_weights_that_cannot_be_encoded_give_none(units, n):
    assert encode(UnionLayout(1, 3, 8), units, n) is None


def test_too_many_weight_vectors_for_the_code_bits_give_none():
    assert encode(UnionLayout(1, 40, 8), [100] + [0] * 39, 100) is None  # C(139, 39) > 2**32


def test_other_ids_are_not_mixtures():
    for lora_id in (1, 2, 12345, stable_lora_id("expert-gsm8k"), stable_lora_id("composite-x"), (1 << 63) + 5, -3):
        assert decode(lora_id) is None


def test_layout_rejects_out_of_range_fields():
    for bad in ((128, 3, 8), (1, 0, 8), (1, 64, 8), (1, 3, 0), (1, 3, 256), (1, 1024, 8, False, True)):
        with pytest.raises(ValueError):
            UnionLayout(*bad)


def test_unions_too_large_for_dense_codes_take_the_sparse_form():
    assert not UnionLayout.sized(1, 63, 8, grid_units=2).sparse and UnionLayout.sized(1, 64, 8, grid_units=2).sparse
    assert not UnionLayout.sized(1, 16, 8).sparse and UnionLayout.sized(1, 17, 8).sparse  # grid 1/20: 2**32 codes
    assert not UnionLayout.sized(1, 17, 8, shared=True).sparse
    assert UnionLayout.sized(1, 1023, 16, shared=True).routed == 1022


@pytest.mark.parametrize("experts,shared", [(3, False), (5, True), (1000, False), (1023, True)])
def test_sparse_ids_round_trip_every_mixture_of_one_or_two_experts(experts, shared):
    layout = UnionLayout(3, experts, 16, shared, sparse=True)
    routed, n = experts - shared, 20
    picks = sorted({0, 1, routed // 2, routed - 1})
    seen = set()
    for i, j in itertools.combinations_with_replacement(picks, 2):
        for u in ([n] if i == j else range(1, n)):
            units = [0] * routed
            units[i] += u
            units[j] += n - u
            lora_id = encode(layout, units, n)
            code = decode(lora_id)
            assert isinstance(code, MixtureCode) and code.layout == layout and code.units == tuple(units)
            assert code.blocks == tuple((k, w / n) for k, w in enumerate(units) if w) + (
                ((experts - 1, 1.0),) if shared else ())
            seen.add(lora_id)
    assert len(seen) == len(picks) + comb(len(picks), 2) * (n - 1)  # distinct ids
    assert [decode(member_id(layout, i)) for i in picks] == [MemberCode(layout, i) for i in picks]


def test_sparse_ids_carry_at_most_two_experts():
    layout = UnionLayout.sized(3, 100, 8)
    assert encode(layout, [1, 1, 1] + [0] * 97, 3) is None  # three experts: a composite
    assert decode(encode(layout, [0] * 99 + [7], 7)).blocks == ((99, 1.0),)
    assert encode(layout, [0] * 100, 5) is None


def test_families_keep_unions_apart():
    a, b = UnionLayout(1, 3, 8), UnionLayout(2, 3, 8)
    assert encode(a, [1, 1, 0], 2) != encode(b, [1, 1, 0], 2)
    assert member_id(a, 0) != member_id(b, 0) and mixture_ids.TAG & member_id(a, 2)
    assert len({encode(a, [1, 1, 0], 2), *(member_id(a, i) for i in range(3))}) == 4
