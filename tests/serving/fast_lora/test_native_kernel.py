"""The fused pair kernel (serving/fast_lora/pair_kernel.cpp) against a float64 loop over its pairs, its input checks,
and the torch layouts taking over when it is off.

It must build wherever a C++ compiler is installed; with none, or with MODE_COTD_NATIVE_LORA=0, the kernel's own
tests skip and the op tests check the torch layouts only.
"""

from __future__ import annotations

import pytest
import torch

from serving.fast_lora import native

HIDDEN = 37  # not a multiple of the kernel's 16 lanes: its tails run too
SLICES = (40, 19, 16, 83)  # 83: the expand's 64-wide, 16-wide and one-by-one loops
SLOTS, RANK = 6, 8


@pytest.fixture(scope="module")
def kernel():
    from tests.serving.fast_lora.conftest import native_kernel_or_skip

    return native_kernel_or_skip()


def _weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g) for _ in SLICES]  # [S, 1, R, H]
    b = [torch.randn(SLOTS, 1, n, RANK, generator=g) for n in SLICES]  # [S, 1, n, R]
    return a, b


def _groups():
    """(slot, rank or -1, [(row, weight)]): row 2 in three groups, a group of rank 3, one of all RANK rows, one of 6
    pairs (a block of four and one of two)."""
    return [(1, 3, [(0, 1.0), (2, 0.25)]), (2, -1, [(2, 0.5), (4, 1.0), (5, -2.0)]), (4, 8, [(2, 0.125)]),
            (5, 5, []), (0, 6, [(0, 1.0), (1, 2.0), (3, 0.5), (4, -1.0), (5, 0.25), (6, 1.5)])]


def _flat(groups, b):
    slots = torch.tensor([g[0] for g in groups])
    starts = torch.tensor([0] + [len(g[2]) for g in groups]).cumsum(0)
    ranks = torch.tensor([g[1] for g in groups])
    rows = torch.tensor([r for g in groups for r, _ in g[2]], dtype=torch.long)
    weights = torch.tensor([w for g in groups for _, w in g[2]], dtype=torch.float32)
    bts = [bi[:, 0].index_select(0, slots).transpose(1, 2).contiguous() for bi in b]  # [G, R, n]
    return slots, starts, ranks, rows, weights, bts


def _expected(y, x, a, b, groups, scale, round_h=False):
    """y[row, oᵢ:oᵢ+nᵢ] + scale·w · x[row] @ Aᵢ[s][:r]ᵀ @ Bᵢ[s][:, :r]ᵀ per pair, in float64 (`round_h`: h, scale and
    weight applied, rounded to bfloat16 before the expand; the weights as given, bfloat16 widened)."""
    out = y.double().clone()
    for slot, rank, pairs in groups:
        r = RANK if rank < 0 else rank
        for row, w in pairs:
            offset = 0
            for ai, bi, n in zip(a, b, SLICES):
                h = scale * w * (x[row].double() @ ai[slot, 0, :r].double().t())  # [r]
                h = h.to(torch.bfloat16).double() if round_h else h
                out[row, offset : offset + n] += h @ bi[slot, 0, :, :r].double().t()
                offset += n
    return out


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_the_kernel_adds_each_pairs_product_at_its_weight_and_rank(kernel, scale):
    a, b = _weights(seed=0)
    x = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(1))
    y = torch.randn(7, sum(SLICES) + 3, generator=torch.Generator().manual_seed(2))  # 3 columns past the slices
    expected = _expected(y, x, a, b, _groups(), scale)
    slots, starts, ranks, rows, weights, bts = _flat(_groups(), b)
    kernel.pair_lora(y, x, a, bts, slots, starts, ranks, rows, weights, scale)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(y[:, sum(SLICES):], torch.randn(7, sum(SLICES) + 3, generator=torch.Generator().manual_seed(2))[
        :, sum(SLICES):])  # columns past the slices untouched


def test_the_kernel_reads_strided_x_and_a_stacked_without_the_middle_dimension(kernel):
    a, b = _weights(seed=3)
    a3 = [ai[:, 0] for ai in a]  # [S, R, H]
    x = torch.randn(HIDDEN, 7).t()  # [7, H], columns strided: the op makes it contiguous, the kernel refuses it
    y = torch.zeros(7, sum(SLICES))
    slots, starts, ranks, rows, weights, bts = _flat(_groups(), b)
    with pytest.raises(RuntimeError, match="x must be contiguous in its last dimension"):
        kernel.pair_lora(y, x, a3, bts, slots, starts, ranks, rows, weights, 1.0)
    kernel.pair_lora(y, x.contiguous(), a3, bts, slots, starts, ranks, rows, weights, 1.0)
    torch.testing.assert_close(y.double(), _expected(torch.zeros(7, sum(SLICES)), x, a, b, _groups(), 1.0),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("change, message", [
    (lambda f: {**f, "rows": torch.tensor([0, 2, 2, 4, 5, 9, 0, 1, 3, 4, 5, 6])}, "a pair's row is out of range"),
    (lambda f: {**f, "rows": torch.tensor([0, 2, 4, 2, 5, 2, 0, 1, 3, 4, 5, 6])}, "group 1's rows must increase"),
    (lambda f: {**f, "slots": torch.tensor([1, 2, 4, 6, 0])}, "group 3's slot 6 is out of range"),
    (lambda f: {**f, "ranks": torch.tensor([3, -1, 9, 5, 6])}, "group 2's rank 9 exceeds its blocks"),
    (lambda f: {**f, "weights": f["weights"].double()}, "weights must be a float32 CPU tensor"),
    (lambda f: {**f, "rows": f["rows"].int()}, "index tensors are contiguous int64"),
    (lambda f: {**f, "starts": torch.tensor([0, 2, 5, 6, 6])}, r"starts \[G\+1\] and ranks \[G\]"),
    (lambda f: {**f, "bt": f["bt"][:2]}, "one A and one B per slice"),
])
def test_bad_input_is_refused_before_anything_is_written(kernel, change, message):
    a, b = _weights(seed=4)
    x = torch.randn(7, HIDDEN)
    y = torch.randn(7, sum(SLICES))
    before = y.clone()
    slots, starts, ranks, rows, weights, bts = _flat(_groups(), b)
    f = change({"slots": slots, "starts": starts, "ranks": ranks, "rows": rows, "weights": weights, "bt": bts})
    with pytest.raises(RuntimeError, match=message):
        kernel.pair_lora(y, x, a, f["bt"], f["slots"], f["starts"], f["ranks"], f["rows"], f["weights"], 1.0)
    assert torch.equal(y, before)


def _in_place(b, dtype):
    return [bi.to(dtype) for bi in b]  # vLLM's stacked B [S, 1, n, R]


@pytest.mark.parametrize("squeeze", [False, True])
def test_the_kernel_reads_b_in_place_as_it_reads_b_gathered(kernel, squeeze):
    a, b = _weights(seed=5)
    x = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(6))
    y0 = torch.randn(7, sum(SLICES), generator=torch.Generator().manual_seed(7))
    slots, starts, ranks, rows, weights, bts = _flat(_groups(), b)
    stacked = [bi[:, 0] if squeeze else bi for bi in b]  # [S, n, R] or [S, 1, n, R]
    y_gathered, y_in_place = y0.clone(), y0.clone()
    kernel.pair_lora(y_gathered, x, a, bts, slots, starts, ranks, rows, weights, 0.5)
    kernel.pair_lora(y_in_place, x, a, stacked, slots, starts, ranks, rows, weights, 0.5, True)
    assert torch.equal(y_in_place, y_gathered)  # the same sums in the same order
    torch.testing.assert_close(y_in_place.double(), _expected(y0, x, a, b, _groups(), 0.5), rtol=1e-5, atol=1e-4)


def test_bfloat16_weights_are_widened_and_h_is_rounded_to_bfloat16_with_round_h(kernel):
    a32, b32 = _weights(seed=8)
    a, b = [ai.to(torch.bfloat16) for ai in a32], _in_place(b32, torch.bfloat16)
    x = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(9))
    y0 = torch.zeros(7, sum(SLICES))
    slots, starts, ranks, rows, weights, _ = _flat(_groups(), b32)
    rounded, unrounded = y0.clone(), y0.clone()
    kernel.pair_lora(rounded, x, a, b, slots, starts, ranks, rows, weights, 0.5, True, True)
    kernel.pair_lora(unrounded, x, a, b, slots, starts, ranks, rows, weights, 0.5, True, False)
    for y, round_h in ((rounded, True), (unrounded, False)):
        torch.testing.assert_close(y.double(), _expected(y0, x, a, b, _groups(), 0.5, round_h), rtol=1e-5, atol=1e-4)
    assert not torch.equal(rounded, unrounded)


@pytest.mark.parametrize("weights_of, in_place, message", [
    (lambda a, b: (a, [bi.to(torch.bfloat16) for bi in b]), True, "B must be a CPU tensor of the weights' dtype"),
    (lambda a, b: ([ai.to(torch.bfloat16) for ai in a], b), True, "B must be a CPU tensor of the weights' dtype"),
    (lambda a, b: ([ai.half() for ai in a], [bi.half() for bi in b]), True, "float32 or bfloat16, not Half"),
    (lambda a, b: ([ai.to(torch.bfloat16) for ai in a], [bi.to(torch.bfloat16) for bi in b]), False,
     "bfloat16 weights need b_in_place"),
])
def test_weights_of_other_or_mixed_dtypes_are_refused(kernel, weights_of, in_place, message):
    a, b = weights_of(*_weights(seed=10))
    y = torch.randn(7, sum(SLICES))
    before = y.clone()
    slots, starts, ranks, rows, weights, bts = _flat(_groups(), _weights(seed=10)[1])
    with pytest.raises(RuntimeError, match=message):
        kernel.pair_lora(y, torch.randn(7, HIDDEN), a, b if in_place else bts, slots, starts, ranks, rows, weights,
                         1.0, in_place)
    assert torch.equal(y, before)


def test_the_build_name_changes_with_the_source_torch_and_the_cpu(monkeypatch):
    name = native.build_name()
    assert name.startswith("mode_cotd_pair_lora_") and name == native.build_name()
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : another cpu")
    assert native.build_name() != name


def test_with_the_kernel_off_the_op_falls_back_to_the_torch_layouts(monkeypatch, caplog):
    from serving.fast_lora.mixture_ids import UnionLayout, encode, member_id
    from serving.fast_lora.ops import pair_lora_linear
    from serving.fast_lora.pairs import step_pairs

    layout = UnionLayout(family=3, experts=3, block_rank=4)
    ids = [member_id(layout, e) for e in range(3)] + [encode(layout, [1, 1, 0], 2)]
    pairs = step_pairs(torch.tensor([3, 0, 2, 3, 1]), ids)
    assert pairs.flat is not None
    a = [torch.randn(4, 1, RANK, HIDDEN) for _ in SLICES]
    b = [torch.randn(4, 1, n, RANK) for n in SLICES]
    x, y0 = torch.randn(5, HIDDEN), torch.randn(5, sum(SLICES))
    results = {}
    for env in ("1", "0"):
        monkeypatch.setenv(native.ENV, env)
        monkeypatch.setattr(native, "_loaded", {})
        monkeypatch.setattr(native, "_reason", {})
        y = y0.clone()
        pair_lora_linear(y, x, a, b, pairs, 0.5, SLICES)
        results[env] = y
    assert native.unavailable_reason() == f"{native.ENV}=0 turns the fused LoRA kernel off"
    assert "the fused kernel is not used" in caplog.text
    if not native.disabled():
        torch.testing.assert_close(results["0"], results["1"], rtol=1e-5, atol=1e-5)
