"""The grouped wrapper against vLLM's own PunicaWrapperCPU (and the plain reference) on random inputs.

No model: both wrappers get the same LoRA mapping through `update_metadata`, then every op
vLLM calls for our students, on prefill-shaped (runs of tokens per request) and
decode-shaped (one token per request, interleaved adapters) steps, with tokens that use no
adapter. vLLM's CPU ops read the last slot for those tokens (they index with -1), so when
comparing with vLLM the last slot stays empty, as it is in vLLM until every slot is in use.
"""

from __future__ import annotations

import pytest
import torch

from serving.fast_lora import pairs, reference
from serving.fast_lora.segments import group_rows

pytestmark = pytest.mark.vllm

SLOTS = 4  # the last slot stays empty (see the module docstring)
RANK = 16  # max_lora_rank; adapters use 8 or 16 of it, the rest is zero padding as in vLLM
HIDDEN = 64
QKV_SLICES = (64, 32, 32)
VOCAB = 96
IDS = [11, 12, 13, None]  # lora_index_to_id: slot -> LoRA id

# Per-token LoRA ids (0: no adapter), per step shape. Prefill: short chunks of one request's tokens; slot of id 11
# appears in two separate chunks. Decode: one token per request, adapters interleaved. Both take the batched
# (bmm) path. "skewed": a run of 20 rows on one adapter, two single rows batched; "padded": one adapter with
# too many scattered rows to pad the others to, looped; "one_adapter": a lone slot, looped.
STEPS = {
    "prefill": ([11] * 5 + [0] * 3 + [13] * 7 + [11] * 4 + [12] * 2, [11, 0, 13, 11, 12], True),
    "decode": ([11, 0, 12, 11, 13, 13, 0, 12, 11], [11, 0, 12, 11, 13, 13, 0, 12, 11], False),
    "skewed": ([11] * 20 + [0, 12, 13], [11, 0, 12, 13], True),
    "padded": ([11, 12, 11, 11, 13, 11, 11, 0, 11, 11, 11, 11, 11], [11, 12, 11, 11, 13, 11, 11, 0, 11, 11, 11, 11,
                                                                   11], False),
    "one_adapter": ([12] * 9, [12] * 3, True),
    "no_adapter": ([0] * 6, [0] * 2, True),
}
PATHS = {  # (runs, looped slots, batched slots)
    "prefill": (0, 0, 3), "decode": (0, 0, 3), "skewed": (1, 0, 2), "padded": (0, 1, 2), "one_adapter": (0, 1, 0),
    "no_adapter": (0, 0, 0)}


def _wrappers(step: str):
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from serving.fast_lora.wrapper import PunicaWrapperGrouped

    tokens, prompts, is_prefill = STEPS[step]
    mapping = LoRAMapping(tuple(tokens), tuple(prompts), is_prefill=is_prefill)
    pair = (PunicaWrapperCPU(256, 16, "cpu"), PunicaWrapperGrouped(256, 16, "cpu"))
    for w in pair:
        w.update_metadata(mapping, IDS, SLOTS + 1, VOCAB)
    return pair, len(tokens), len(prompts)


def _stacked(out: int, inp: int, dtype: torch.dtype, seed: int, fill_last: bool = False) -> torch.Tensor:
    """vLLM's stacked weights [S, 1, out, inp]: per slot a random adapter of rank 8 or 16, zero-padded."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(SLOTS, 1, out, inp)
    for slot in range(SLOTS if fill_last else SLOTS - 1):
        rank = 8 if slot % 2 else 16
        block = torch.randn(out, inp, generator=g) * 0.2
        if out == RANK:  # A: [R, H], rows past the rank are padding
            block[rank:] = 0
        elif inp == RANK:  # B: [N, R]
            block[:, rank:] = 0
        w[slot, 0] = block
    return w.to(dtype)


def _slot_indices(wrapper) -> torch.Tensor:
    return wrapper.token_lora_indices.clone()


TOL = {torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_add_lora_linear_matches_vllm(step, dtype, scale, layout):
    (theirs, ours), t, _ = _wrappers(step)
    p = ours.pairs
    if layout == "by_slot":
        assert (len(p.runs), len(p.loop), 0 if p.batch is None else p.batch.slots.numel()) == PATHS[step]
    elif layout.startswith("fused"):  # the rows outside runs and the short runs flat, every pair once
        assert (p.flat is None) == (not p.table()) and p.flat_table() == pytest.approx(p.table())
        assert all(r.count * len(r.parts) > pairs.FLAT_RUN_MAX_PAIRS for r in p.flat_runs)
    else:  # the rows outside runs, all of them dense
        assert (len(p.runs), p.loop, p.batch) == (PATHS[step][0], (), None)
        assert (0 if p.dense is None else p.dense.slots.numel()) == PATHS[step][1] + PATHS[step][2]
    torch.manual_seed(0)
    a = tuple(_stacked(RANK, HIDDEN, dtype, seed=i) for i in range(3))
    b = tuple(_stacked(n, RANK, dtype, seed=10 + i) for i, n in enumerate(QKV_SLICES))
    x = torch.randn(t, HIDDEN).to(dtype)  # [T, H]
    y0 = torch.randn(t, sum(QKV_SLICES)).to(dtype)  # [T, N]
    y_theirs, y_ours = y0.clone(), y0.clone()
    theirs.add_lora_linear(y_theirs, x, a, b, scale, QKV_SLICES)
    ours.add_lora_linear(y_ours, x, a, b, scale, QKV_SLICES)
    torch.testing.assert_close(y_ours, y_theirs, **TOL[dtype])
    expected = reference.lora_linear(y0, x, a, b, _slot_indices(ours), scale, QKV_SLICES).to(dtype)
    torch.testing.assert_close(y_ours, expected, **TOL[dtype])
    if step == "no_adapter":
        assert torch.equal(y_ours, y0)


@pytest.mark.parametrize("step", list(STEPS))
def test_shrink_then_expand_match_vllm(step):
    """The unfused path (vLLM's fully sharded layers): add_shrink into float32 buffers, then add_expand."""
    (theirs, ours), t, _ = _wrappers(step)
    dtype = torch.bfloat16
    a = tuple(_stacked(RANK, HIDDEN, dtype, seed=i) for i in range(3))
    b = tuple(_stacked(n, RANK, dtype, seed=10 + i) for i, n in enumerate(QKV_SLICES))
    x = torch.randn(t, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)
    y0 = torch.randn(t, sum(QKV_SLICES), generator=torch.Generator().manual_seed(2)).to(dtype)
    outputs = []
    for w in (theirs, ours):
        buffers = torch.zeros(3, t, RANK, dtype=torch.float32)  # [slices, T, R]
        w.add_shrink(buffers, x, a, 0.5)
        y = y0.clone()
        w.add_expand(y, buffers, b, QKV_SLICES, offset_start=0, add_input=True)
        outputs.append((buffers, y))
    (buf_theirs, y_theirs), (buf_ours, y_ours) = outputs
    rows = _slot_indices(ours) >= 0  # vLLM also writes rows without an adapter (from the empty last slot)
    torch.testing.assert_close(buf_ours[:, rows], buf_theirs[:, rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_ours, y_theirs, **TOL[dtype])
    for i in range(3):
        expected = reference.shrink(torch.zeros(t, RANK), x, a[i], _slot_indices(ours), 0.5).float()
        torch.testing.assert_close(buf_ours[i], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("step", list(STEPS))
def test_add_lora_embedding_matches_vllm(step):
    (theirs, ours), t, _ = _wrappers(step)
    dtype = torch.bfloat16
    b = _stacked(HIDDEN, RANK, dtype, seed=3)  # [S, 1, D, R]
    x = torch.randn(t, RANK, generator=torch.Generator().manual_seed(4)).to(dtype)  # the adapters' embedding rows
    y0 = torch.randn(t, HIDDEN, generator=torch.Generator().manual_seed(5)).to(dtype)
    y_theirs, y_ours = y0.clone(), y0.clone()
    theirs.add_lora_embedding(y_theirs, x, b, add_input=True)
    ours.add_lora_embedding(y_ours, x, b, add_input=True)
    torch.testing.assert_close(y_ours, y_theirs, **TOL[dtype])
    torch.testing.assert_close(y_ours, reference.expand(y0, x, b, _slot_indices(ours)).to(dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("step", list(STEPS))
def test_add_lora_logits_matches_vllm(step, dtype):
    """Logits use the sampled rows' slots (vLLM's sampler indices), one row per request here."""
    (theirs, ours), _, n = _wrappers(step)
    a = _stacked(RANK, HIDDEN, dtype, seed=6)
    b = _stacked(VOCAB, RANK, dtype, seed=7)
    x = torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(8)).to(dtype)
    y0 = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(9)).to(dtype)
    y_theirs, y_ours = y0.clone(), y0.clone()
    theirs.add_lora_logits(y_theirs, x, a, b, 1.0)
    ours.add_lora_logits(y_ours, x, a, b, 1.0)
    torch.testing.assert_close(y_ours, y_theirs, **TOL[dtype])
    expected = reference.lora_linear(y0, x, (a,), (b,), ours.sampler_indices.clone(), 1.0, (VOCAB,)).to(dtype)
    torch.testing.assert_close(y_ours, expected, **TOL[dtype])


def test_rows_without_adapter_stay_untouched_with_every_slot_filled():
    """With all slots in use, tokens without an adapter get nothing (vLLM's CPU ops would add the last slot's)."""
    (_, ours), t, _ = _wrappers("decode")
    dtype = torch.float32
    a = tuple(_stacked(RANK, HIDDEN, dtype, seed=i, fill_last=True) for i in range(3))
    b = tuple(_stacked(n, RANK, dtype, seed=10 + i, fill_last=True) for i, n in enumerate(QKV_SLICES))
    x = torch.randn(t, HIDDEN, generator=torch.Generator().manual_seed(1))
    y0 = torch.randn(t, sum(QKV_SLICES), generator=torch.Generator().manual_seed(2))
    y = y0.clone()
    ours.add_lora_linear(y, x, a, b, 1.0, QKV_SLICES)
    none = _slot_indices(ours) < 0
    assert none.any() and torch.equal(y[none], y0[none])
    torch.testing.assert_close(y, reference.lora_linear(y0, x, a, b, _slot_indices(ours), 1.0, QKV_SLICES).float())


def test_group_rows_slices_runs_and_indexes_scattered_rows():
    groups = group_rows(torch.tensor([2, 2, -1, 0, 0, 0, 2, -1, 1]))
    assert [g.slot for g in groups] == [0, 1, 2]
    assert groups[0].rows == slice(3, 6) and groups[0].count == 3
    assert groups[1].rows == slice(8, 9)
    assert torch.equal(groups[2].rows, torch.tensor([0, 1, 6])) and groups[2].count == 3
    assert group_rows(torch.tensor([-1, -1])) == [] and group_rows(torch.empty(0, dtype=torch.long)) == []


def test_padded_rows_beyond_the_mapping_are_left_alone(layout):
    """If the layer sees more rows than the step's mapping (padding), the extra rows get nothing."""
    (_, ours), t, _ = _wrappers("decode")
    assert {"by_slot": ours.pairs.batch, "dense": ours.pairs.dense, "fused": ours.pairs.flat, "fused_in_place": ours.pairs.flat}[layout] is not None
    dtype = torch.float32
    a = tuple(_stacked(RANK, HIDDEN, dtype, seed=i) for i in range(3))
    b = tuple(_stacked(n, RANK, dtype, seed=10 + i) for i, n in enumerate(QKV_SLICES))
    x = torch.randn(t + 2, HIDDEN, generator=torch.Generator().manual_seed(1))
    y0 = torch.randn(t + 2, sum(QKV_SLICES), generator=torch.Generator().manual_seed(2))
    y = y0.clone()
    ours.add_lora_linear(y, x, a, b, 1.0, QKV_SLICES)
    indices = torch.cat([_slot_indices(ours), torch.tensor([-1, -1])])
    torch.testing.assert_close(y, reference.lora_linear(y0, x, a, b, indices, 1.0, QKV_SLICES).float())
