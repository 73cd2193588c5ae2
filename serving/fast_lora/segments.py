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
    rank: int | None = None
    """The most rows of A any group's slot can have non-zero (None: all): the largest Group.rank, when every
    group has one."""


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
        rows = _row_numbers(g.rows)  # [count]
        gather[i, : g.count] = rows
        scatter[i, : g.count] = rows
    slots = torch.tensor([g.slot for g in groups], dtype=torch.long)
    ranks = [g.rank for g in groups]
    rank = None if None in ranks else max(ranks)
    return Batched(slots, gather.view(-1), scatter.view(-1), width, total_rows, rank)


@dataclass(frozen=True)
class BlockRows:
    """Experts that many of a step's mixture rows use: block-scaled over all mixture rows at once.

    Cost per layer: count × K·b (every mixture row against every one of these blocks)."""

    experts: torch.Tensor
    """[K] int64: the experts' blocks in the union, increasing."""
    slots: tuple[int, ...]
    """The K experts' slots, in the same order."""
    weights: torch.Tensor
    """[count, K] float32: each mixture row's weight per expert (zero where the row does not use it)."""
    complete: bool
    """K = E: every expert of the union (its blocks in union order, no selection)."""


@dataclass(frozen=True)
class PairRows:
    """Experts that few of a step's mixture rows use: one (row, expert) pair per non-zero weight, the pairs of
    each expert padded to `width` and multiplied in one batched matmul pair (position p = g·width + j: the j-th
    row of expert g). Cost per layer: G·width, whatever the number of rows that use no such expert."""

    experts: torch.Tensor
    """[G] int64: the experts' blocks in the union, increasing."""
    slots: tuple[int, ...]
    """The G experts' slots, in the same order."""
    rows: torch.Tensor
    """[G·width] int64: the step row of each position, read from x and added to in y (padding: the first
    mixture row, at weight 0, so it adds exactly 0)."""
    into: torch.Tensor
    """[G·width] int64: the same row's index among the step's mixture rows (0 … count-1)."""
    weights: torch.Tensor
    """[G·width] float32: the pair's weight (0 for padding)."""
    width: int
    """Pairs per expert after padding (the most rows any of these experts has)."""


PAIR_FACTOR = 4
"""An expert used by fewer than 1/PAIR_FACTOR of the step's mixture rows is served by pairs..."""
MIN_PAIR_EXPERTS = 4
"""... when at least this many experts are (below that, one block-scaled matmul pair costs less than two)."""


@dataclass(frozen=True)
class UnionRows:
    """The rows of a step that use mixture ids (serving.fast_lora.mixture_ids), served by their union's members.

    Only the experts some row uses are read: `blocks` (used by many rows) and `pairs` (used by few). The cost
    of a step grows with the rows and the pairs, not with the union's size or the number of distinct mixtures.
    """

    rows: Rows
    """Which rows use a mixture id."""
    count: int
    """How many rows."""
    blocks: BlockRows | None
    """The widely used experts, block-scaled (None: none)."""
    pairs: PairRows | None
    """The narrowly used experts, by pairs (None: none)."""
    block_rank: int
    """b: the experts' rank; an expert's block is the first b rows of its slot's A (columns of B)."""
    layout: mixture_ids.UnionLayout
    """The union (its family tells unions with the same E and b apart)."""


def mixture_slots(lora_index_to_id: list[int | None]) -> dict[int, mixture_ids.MixtureCode]:
    """Slot -> decoded mixture id, for the slots that hold one (once per step, for tokens and logits); read-only."""
    return _slot_table(tuple(lora_index_to_id)).mixtures


@dataclass(frozen=True)
class _SlotTable:
    """What the slot table holds, read once per table: a union of a thousand pinned experts is a thousand slots."""

    slot_of: dict[int, int]
    """LoRA id -> slot."""
    mixtures: dict[int, mixture_ids.MixtureCode]
    """Slot -> decoded mixture id."""
    member_ranks: dict[int, int]
    """Slot -> block rank of the union member id it holds."""


@functools.lru_cache(maxsize=8)
def _slot_table(lora_index_to_id: tuple[int | None, ...]) -> _SlotTable:
    """The table's scan, cached: it changes only when adapters are loaded or evicted."""
    table = _SlotTable({}, {}, {})
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


def split_union_rows(indices: torch.Tensor, lora_index_to_id: list[int | None],
                     mixtures: dict[int, mixture_ids.MixtureCode]) -> tuple[UnionRows | None, torch.Tensor]:
    """(the rows whose slot holds a mixture id, served by the union; `indices` with those rows set to -1).

    indices: [T] int64 slot per row (-1 = no LoRA); mixtures: mixture_slots(lora_index_to_id). Raises
    RuntimeError when a step has mixture ids but an expert they use is not in a slot, or mixture ids of
    different unions.
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
    in_step = torch.unique(which[present]).tolist()  # [M] mixtures of the step, increasing
    layouts = {codes[i].layout for i in in_step}
    if len(layouts) > 1:
        raise RuntimeError(f"one step mixes mixture ids of {len(layouts)} different unions: {sorted(map(str, layouts))}")
    layout = layouts.pop()
    used = sorted({block for i in in_step for block, _ in codes[i].blocks})  # [K] the step's experts
    column = {block: k for k, block in enumerate(used)}
    per_mixture = torch.zeros(len(codes), len(used))  # [all mixtures, K]; mixtures not in the step stay zero
    for i in in_step:
        for block, weight in codes[i].blocks:
            per_mixture[i, column[block]] = weight
    slot_of = _slot_table(tuple(lora_index_to_id)).slot_of
    slots = [slot_of.get(mixture_ids.member_id(layout, e)) for e in used]
    missing = [e for e, slot in zip(used, slots) if slot is None]
    if missing:
        raise RuntimeError(f"mixture ids of union {layout} are in the step but its experts {missing} are not in "
                           "a slot: load and pin every member of the union first")
    (group,) = group_rows(torch.where(present, 0, -1))
    weights = per_mixture[which[present]]  # [count, K]
    narrow = weights.ne(0).sum(0) * PAIR_FACTOR < group.count  # [K]
    if int(narrow.sum()) < MIN_PAIR_EXPERTS:
        narrow.zero_()
    experts = torch.tensor(used, dtype=torch.long)
    blocks = pairs = None
    if not bool(narrow.all()):
        wide = (~narrow).nonzero().flatten()  # [K_D]
        blocks = BlockRows(experts[wide], tuple(slots[k] for k in wide.tolist()), weights.index_select(1, wide),
                           complete=len(wide) == layout.experts)
    if bool(narrow.any()):
        few = narrow.nonzero().flatten()  # [G]
        pairs = _pairs(weights.index_select(1, few), _row_numbers(group.rows), experts[few],
                       tuple(slots[k] for k in few.tolist()))
    union = UnionRows(group.rows, group.count, blocks, pairs, layout.block_rank, layout)
    return union, torch.where(present, -1, indices)


def _row_numbers(rows: Rows) -> torch.Tensor:
    """rows as an index tensor [count] int64."""
    return torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows


def _pairs(weights: torch.Tensor, row_numbers: torch.Tensor, experts: torch.Tensor,
           slots: tuple[int, ...]) -> PairRows:
    """The pair layout of weights [count, G] (mixture row i is step row row_numbers[i])."""
    g = weights.shape[1]
    expert, row = weights.t().nonzero(as_tuple=True)  # [P] each, by expert, then row
    per_expert = torch.bincount(expert, minlength=g)  # [G]
    width = int(per_expert.max())
    position = torch.arange(expert.numel()) - (torch.cumsum(per_expert, 0) - per_expert)[expert]  # [P]
    flat = expert * width + position  # [P]
    into = torch.zeros(g * width, dtype=torch.long)
    pair_weights = torch.zeros(g * width)
    into[flat] = row
    pair_weights[flat] = weights[row, expert]
    return PairRows(experts, slots, row_numbers[into], into, pair_weights, width)


def without_mixture_slots(indices: torch.Tensor, mixtures: dict[int, mixture_ids.MixtureCode]) -> torch.Tensor:
    """`indices` ([N] slot per row) with rows on a mixture id's slot (`mixtures`) set to -1: its placeholder adds
    nothing."""
    if not mixtures:
        return indices
    return torch.where(torch.isin(indices, torch.tensor(list(mixtures), dtype=indices.dtype)), -1, indices)
