"""Grouping a step's rows by LoRA slot: the one piece of bookkeeping the grouped ops need.

vLLM gives every token (and every sampled row) the slot of its adapter, -1 for none. The
grouped ops want the opposite view: for each slot present, which rows use it. `group_rows`
computes that once per step (in `update_metadata`, outside the forward pass); every LoRA
layer of the step then reuses it. Rows of one slot that sit next to each other (the usual
case: vLLM's batch keeps a request's tokens together, and one adapter often serves the whole
batch) come back as a `slice`, which the ops read and write in place with no copy; scattered
rows come back as an index tensor (one gather of the activations, one index_add back).

With many adapters in a step (decode with requests on different adapters, a few rows each),
looping over groups costs a fixed overhead per group and layer; `batch_groups` lays the
groups out for one batched matmul (bmm) over all of them instead, padding each to the size
of the largest.
"""

from __future__ import annotations

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


def group_rows(indices: torch.Tensor) -> list[Group]:
    """One Group per slot present in `indices` ([T] int64, -1 = no LoRA), in slot order; -1 rows are left out."""
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
        groups.append(Group(slot, slice(first, last + 1) if contiguous else rows, count))
    return groups


@dataclass(frozen=True)
class Batched:
    """The groups of a step laid out for batched matmuls: G groups, each padded to `width` rows.

    Position p = i·width + j is the j-th row of group i; padding positions read row 0 of x and
    write to row T (a scratch row past the step's T rows), so they never reach the output.
    """

    slots: torch.Tensor
    """[G] int64: each group's slot."""
    gather: torch.Tensor
    """[G·width] int64: the row of x each position reads."""
    scatter: torch.Tensor
    """[G·width] int64: the row of y each position writes (T for padding)."""
    width: int
    """Rows per group after padding (the largest group's count)."""
    rows: int
    """T, the rows of the step the layout was made for."""


BATCH_MAX_PADDING = 2.0
"""Batch the groups only while padding at most doubles the rows with an adapter; else loop over them."""


def batch_groups(groups: list[Group], total_rows: int) -> Batched | None:
    """The batched layout of `groups` over a step of `total_rows` rows; None for one group or too much padding."""
    if len(groups) < 2:
        return None
    width = max(g.count for g in groups)
    if len(groups) * width > BATCH_MAX_PADDING * sum(g.count for g in groups):
        return None
    gather = torch.zeros(len(groups), width, dtype=torch.long)  # [G, width]
    scatter = torch.full((len(groups), width), total_rows, dtype=torch.long)  # [G, width]
    for i, g in enumerate(groups):
        rows = torch.arange(g.rows.start, g.rows.stop) if isinstance(g.rows, slice) else g.rows  # [count]
        gather[i, : g.count] = rows
        scatter[i, : g.count] = rows
    slots = torch.tensor([g.slot for g in groups], dtype=torch.long)
    return Batched(slots, gather.view(-1), scatter.view(-1), width, total_rows)


@dataclass(frozen=True)
class UnionRows:
    """The rows of a step that use mixture ids (serving.fast_lora.mixture_ids), served by their union's members."""

    member_slots: tuple[int, ...]
    """Slot of each expert of the union, in the union's order (E slots)."""
    rows: Rows
    """Which rows use a mixture id."""
    count: int
    """How many rows."""
    weights: torch.Tensor
    """[count, K] float32: each row's weight per expert in use (`experts`)."""
    experts: torch.Tensor | None
    """[K] int64: the experts any row of the step uses (weight ≠ 0), None for all E. The ops multiply by these
    experts' blocks only: a step whose mixtures all draw on 2 of 10 experts pays for rank 2·b, not 10·b."""
    block_rank: int
    """b: the experts' rank; the union is their first b rows of A (columns of B), concatenated."""
    layout: mixture_ids.UnionLayout
    """The union (its family tells unions with the same E and b apart)."""


def mixture_slots(lora_index_to_id: list[int | None]) -> dict[int, mixture_ids.MixtureCode]:
    """Slot -> decoded mixture id, for the slots that hold one (decode once per step, use for tokens and logits)."""
    return {slot: code for slot, lora_id in enumerate(lora_index_to_id)
            if lora_id is not None and isinstance(code := mixture_ids.decode(lora_id), mixture_ids.MixtureCode)}


def split_union_rows(indices: torch.Tensor, lora_index_to_id: list[int | None],
                     mixtures: dict[int, mixture_ids.MixtureCode]) -> tuple[UnionRows | None, torch.Tensor]:
    """(the rows whose slot holds a mixture id, served by the union; `indices` with those rows set to -1).

    indices: [T] int64 slot per row (-1 = no LoRA); mixtures: mixture_slots(lora_index_to_id). Raises
    RuntimeError when a step has mixture ids but an expert of their union is not in a slot, or mixture
    ids of different unions.
    """
    if not mixtures:
        return None, indices
    table = torch.full((len(lora_index_to_id) + 1,), -1, dtype=torch.long)  # slot -> row of `codes`; last: -1
    codes = list(mixtures.values())
    for i, slot in enumerate(mixtures):
        table[slot] = i
    which = table[indices]  # [T]: the row's mixture (-1: not a mixture id); slot -1 reads the last entry
    present = which >= 0
    if not bool(present.any()):
        return None, indices
    layouts = {codes[i].layout for i in torch.unique(which[present]).tolist()}
    if len(layouts) > 1:
        raise RuntimeError(f"one step mixes mixture ids of {len(layouts)} different unions: {sorted(map(str, layouts))}")
    layout = layouts.pop()
    slot_of = {lora_id: slot for slot, lora_id in enumerate(lora_index_to_id) if lora_id is not None}
    members = [mixture_ids.member_id(layout, e) for e in range(layout.experts)]
    missing = [e for e, m in enumerate(members) if m not in slot_of]
    if missing:
        raise RuntimeError(f"mixture ids of union {layout} are in the step but its experts {missing} are not in "
                           "a slot: load and pin every member of the union first")
    zeros = (0.0,) * layout.experts  # for mixture ids of other unions, in slots but not in this step
    per_mixture = torch.tensor([c.weights if c.layout == layout else zeros for c in codes],
                               dtype=torch.float32)  # [M, E]
    (group,) = group_rows(torch.where(present, 0, -1))
    weights = per_mixture[which[present]]  # [count, E]
    used = weights.ne(0).any(0).nonzero().flatten()  # [K]
    experts = None if used.numel() == layout.experts else used
    if experts is not None:
        weights = weights.index_select(1, experts)  # [count, K]
    union = UnionRows(tuple(slot_of[m] for m in members), group.rows, group.count, weights, experts,
                      layout.block_rank, layout)
    return union, torch.where(present, -1, indices)


def without_mixture_slots(indices: torch.Tensor, mixtures: dict[int, mixture_ids.MixtureCode]) -> torch.Tensor:
    """`indices` ([N] slot per row) with rows on a mixture id's slot (`mixtures`) set to -1: its placeholder adds
    nothing."""
    if not mixtures:
        return indices
    return torch.where(torch.isin(indices, torch.tensor(list(mixtures), dtype=indices.dtype)), -1, indices)
