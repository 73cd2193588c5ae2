"""Grouping a step's rows by LoRA slot: the one piece of bookkeeping the grouped ops need.

vLLM gives every token (and every sampled row) the slot of its adapter, -1 for none. The
grouped ops want the opposite view: for each slot present, which rows use it. `group_rows`
computes that once per step (in `update_metadata`, outside the forward pass); every LoRA
layer of the step then reuses it. Rows of one slot that sit next to each other (the usual
case: vLLM's batch keeps a request's tokens together, and one adapter often serves the whole
batch) come back as a `slice`, which the ops read and write in place with no copy; scattered
rows come back as an index tensor (one gather of the activations, one index_add back).

The embedding and logits layers (and vLLM's unfused shrink / expand) use these groups; the
linear layers use the step's pairs (serving.fast_lora.pairs), which also serve mixture ids.
This module also reads the slot table once per table (`slot_table`): which slots hold mixture
ids and union members.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from serving.fast_lora import mixture_ids

Rows = slice | torch.Tensor
"""Rows of a step: a contiguous range, or sorted row indices (int64, 1-D)."""


@dataclass(frozen=True)
class Group:
    """The rows of a step that use one LoRA slot."""

    slot: int
    """Index into the stacked LoRA weights (dim 0 of lora_a_stacked / lora_b_stacked)."""
    rows: Rows
    """Which rows use the slot."""
    count: int
    """How many rows."""
    rank: int | None = None
    """Rows of the slot's A (columns of B) that can be non-zero, when fewer than the slots' size: a union member's
    block rank (its id says it; vLLM zeroes the rest of the slot). The ops skip the rest. None: all of them."""


def group_rows(indices: torch.Tensor, ranks: dict[int, int] | None = None) -> list[Group]:
    """One Group per slot present in `indices` ([T] int64, -1 = no LoRA), in slot order; -1 rows are left out.
    `ranks`: slot -> its Group.rank (member_ranks), for the slots that have one."""
    if indices.numel() == 0:
        return []
    order = torch.sort(indices, stable=True)  # stable: each slot's rows stay in increasing order
    slots, counts = torch.unique_consecutive(order.values, return_counts=True)  # [G], [G]
    starts = torch.cumsum(counts, 0) - counts  # [G]
    groups = []
    for slot, start, count in zip(slots.tolist(), starts.tolist(), counts.tolist()):
        if slot < 0:
            continue
        rows = order.indices[start : start + count]  # [count] increasing
        first, last = int(rows[0]), int(rows[-1])
        contiguous = last - first + 1 == count
        groups.append(Group(slot, slice(first, last + 1) if contiguous else rows, count, (ranks or {}).get(slot)))
    return groups


def member_ranks(lora_index_to_id: list[int | None]) -> dict[int, int]:
    """Slot -> block rank, for the slots that hold a union member id (serving.fast_lora.mixture_ids); read-only."""
    return _slot_table(tuple(lora_index_to_id)).member_ranks


def mixture_slots(lora_index_to_id: list[int | None]) -> dict[int, mixture_ids.MixtureCode]:
    """Slot -> decoded mixture id, for the slots that hold one (once per step, for tokens and logits); read-only."""
    return _slot_table(tuple(lora_index_to_id)).mixtures


@dataclass(frozen=True)
class SlotTable:
    """What the slot table holds, read once per table: a union of a thousand pinned experts is a thousand slots."""

    slot_of: dict[int, int]
    """LoRA id -> slot."""
    mixtures: dict[int, mixture_ids.MixtureCode]
    """Slot -> decoded mixture id."""
    member_ranks: dict[int, int]
    """Slot -> block rank of the union member id it holds."""


def slot_table(lora_index_to_id: list[int | None]) -> SlotTable:
    """What the slot table holds (LoRA id -> slot, mixture slots, member ranks); read-only, cached per table."""
    return _slot_table(tuple(lora_index_to_id))


@functools.lru_cache(maxsize=8)
def _slot_table(lora_index_to_id: tuple[int | None, ...]) -> SlotTable:
    """The table's scan, cached: it changes only when adapters are loaded or evicted."""
    table = SlotTable({}, {}, {})
    for slot, lora_id in enumerate(lora_index_to_id):
        if lora_id is None:
            continue
        table.slot_of[lora_id] = slot
        code = mixture_ids.decode(lora_id)
        if isinstance(code, mixture_ids.MixtureCode):
            table.mixtures[slot] = code
        elif isinstance(code, mixture_ids.MemberCode):
            table.member_ranks[slot] = code.layout.block_rank
    return table


def without_mixture_slots(indices: torch.Tensor, mixtures: dict[int, mixture_ids.MixtureCode]) -> torch.Tensor:
    """`indices` ([N] slot per row) with rows on a mixture id's slot (`mixtures`) set to -1: its placeholder adds
    nothing."""
    if not mixtures:
        return indices
    return torch.where(torch.isin(indices, torch.tensor(list(mixtures), dtype=indices.dtype)), -1, indices)
