"""A step's LoRA work as (row, slot, weight) pairs: one layout for adapters, union members and mixtures alike.

Every row with an adapter asks for one or more slots' LoRA, each at a weight:
- a row on an ordinary adapter or a union member id: its own slot, weight 1;
- a row on a mixture id (serving.fast_lora.mixture_ids): one pair per expert of its mixture, the slot that
  holds the expert's member id at the expert's weight wₑ (the mixture id's own slot holds a placeholder that is
  never read).

`step_pairs` builds the pairs once per step (in the wrapper's `update_metadata`) and groups them by slot. The op
(serving.fast_lora.ops.pair_lora_linear) then gives row r, in every LoRA layer,

    y[r] += Σ over r's pairs (s, w):  w · scale · (x[r] @ Aₛᵀ) @ Bₛᵀ

in parts, so that its cost grows with the pairs and not with the number of distinct adapters, experts or
mixtures in the step:
- `runs`: contiguous rows on one adapter or one mixture id (a prefill chunk, a batch on one adapter): one matmul
  pair each over the blocks of its slots side by side, on slices of x and y, with no copy of activations;
- `dense`: the other rows, when few and with many pairs each (mixtures of a few experts: t rows over G slots, more
  pairs than rows, t·G ≤ DENSE_CELLS_PER_PAIR × pairs): every row times every slot's block, at weight 0 where the row has no pair:
  one matmul pair per layer slice over the G slots' blocks side by side, added straight into y's rows;
- `flat`: the pairs outside runs and those of short runs, as flat index tensors grouped by slot, for the fused
  CPU kernel (serving.fast_lora.native), which the op prefers whenever it can run (float32): then only the
  `flat_runs` (long runs, a prefill chunk's) multiply as matmuls, and the other layouts go unused;
- otherwise `loop`: among the other rows' pairs, slots with too many of them to pad the rest to: one matmul pair
  each; and `batch`: the other slots, each padded to the same number of pairs: their weights gathered once per
  layer slice, one batched matmul pair over all of them, the products added back by row in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.fast_lora import mixture_ids
from serving.fast_lora.segments import Rows, SlotTable, slot_table

RUN_MIN_ROWS = 16
"""Contiguous rows on one adapter or mixture id, at least this many, are a run (their rows amortise the call)."""
DENSE_CELLS_PER_PAIR = 5.0
"""The rows outside runs go `dense` while their cells (rows × slots they use) are at most this many times their
pairs: mixtures, whose rows each have a pair with several of a few experts. Rows on one expert each (a decode step
on the gate's single-expert routes, 1 pair in G cells) multiply by slot. Measured with the step probe
(benchmarks/results/issue22-20261207b/dense_probe.txt): 64 rows over 4, 16 or 64 mixtures of 10 experts ran 10-45%
faster dense, 16 rows over 8 experts ~30% slower."""
DENSE_MIN_PAIRS_PER_ROW = 1.0
"""...and while their pairs are more than this many per row: some row is a mixture. Steps of one pair per row keep
their layout by slot, and with it their sums in the order vLLM's ops have them in, with no zero products in
between (bf16 greedy outputs equal to vLLM's, tests/serving/fast_lora/test_greedy_equivalence.py)."""
DENSE_MAX_ROWS = 128
"""...and while they are at most this many rows (the probe measured up to 64; a prefill chunk of scattered rows
beyond that stays with the batch's bmm)."""
FLAT_MAX_PAIRS = 1024
"""A step whose pairs outside runs are at most this many is laid out `flat` for the fused kernel, with its short
runs (a decode step's rows; a prefill chunk of scattered rows beyond that multiplies faster as matmuls). The short
runs' pairs do not count: a prefill chunk of ~48 sequences of ~43 tokens, each on its own top-2 mixture (~4,100
pairs), ran 15-30% faster in the kernel than as 48 runs, in float32 and bfloat16
(benchmarks/results/issue22-20261208b/layout_probe.txt)."""
FLAT_RUN_MAX_PAIRS = 96
"""Runs of at most this many pairs (rows × parts) go flat too. Measured (benchmarks/results/issue22-20261208/
NOTES.md): 32-64 decode rows on one expert ran 1.9-2.4x faster in the kernel than as a run, 128 rows 1.2-1.4x;
16 rows on a top-2 mixture 1.6x, 64 rows the same."""
MAX_PADDING = 2.0
"""The batch pads each slot's pairs to the largest count while that at most doubles the pairs; slots with the most
pairs move to `loop` until it does."""


@dataclass(frozen=True)
class SlotPairs:
    """The pairs of one slot, served by one matmul pair on the slot's own weights."""

    slot: int
    """Index into the stacked LoRA weights (dim 0 of lora_a_stacked / lora_b_stacked)."""
    rows: Rows
    """The rows that use the slot (each once), increasing."""
    count: int
    """How many rows."""
    weights: torch.Tensor | None
    """[count, 1] float32: each row's weight for this slot; None: all 1."""
    rank: int | None
    """Rows of the slot's A (columns of B) that can be non-zero, when fewer than the slot's size: a union member's
    block rank. The op multiplies by these only. None: all of them."""


@dataclass(frozen=True)
class Part:
    """One slot's share of a run: every row of the run multiplies by it at the same weight."""

    slot: int
    weight: float
    rank: int | None
    """As SlotPairs.rank."""


@dataclass(frozen=True)
class Run:
    """Contiguous rows on one adapter or one mixture id: y[rows] += (scale · x[rows] @ [A₁; …; Aₖ]ᵀ ⊙ weights)
    @ [B₁ … Bₖ]ᵀ over its k parts' blocks side by side (k = 1 for an adapter, the mixture's experts for a
    mixture id)."""

    rows: slice
    count: int
    parts: tuple[Part, ...]
    scales: torch.Tensor | None
    """[Σrₚ] float32: each part's weight over its block's columns, for a run of several parts (their ranks are the
    members' block ranks); None for one part (its weight is `parts[0].weight`)."""


@dataclass(frozen=True)
class PairBatch:
    """The pairs of G slots laid out for batched matmuls: position p = g·width + j is slot g's j-th pair."""

    slots: torch.Tensor
    """[G] int64: each group's slot."""
    rows: torch.Tensor
    """[G·width] int64: the row each position reads from x and adds to in y (padding: a real row at weight 0)."""
    weights: torch.Tensor | None
    """[G·width, 1] float32: each position's weight, 0 for padding; None: every position is a pair at weight 1."""
    width: int
    """Pairs per slot after padding (the largest count among the G slots)."""
    rank: int | None
    """The largest SlotPairs.rank of the G slots when all have one, else None (all of the slots' rows)."""
    key: tuple
    """(slots, rank): what the gathered weights depend on (serving.fast_lora.gather_cache)."""


@dataclass(frozen=True)
class DenseRows:
    """Rows against the G slots they use, as one weight matrix W: y[rows] += ((scale · x[rows] @ [A₁; …; A_G]ᵀ)
    ⊙ (W ⊗ 1ᵣ)) @ [B₁ … B_G]ᵀ, row i's pair with slot g at weight W[i, g] (0: no pair)."""

    rows: Rows
    """The t rows, increasing (a slice when contiguous)."""
    slots: torch.Tensor
    """[G] int64: the slots, increasing."""
    weights: torch.Tensor
    """[t, G] float32: W."""
    rank: int | None
    """The largest SlotPairs.rank of the G slots when all have one, else None (all of the slots' rows)."""
    key: tuple
    """(slots, rank): what the gathered weights depend on (serving.fast_lora.gather_cache)."""


@dataclass(frozen=True)
class FlatPairs:
    """The pairs outside runs, grouped by slot, as the fused kernel takes them (serving.fast_lora.native): group g
    is slot slots[g]; its pairs are positions starts[g] .. starts[g+1] of `rows` and `weights`."""

    slots: torch.Tensor
    """[G] int64: each group's slot, increasing."""
    starts: torch.Tensor
    """[G+1] int64: where each group's pairs start (and the last one ends)."""
    ranks: torch.Tensor
    """[G] int64: each group's SlotPairs.rank; -1 for all of the slot's rows."""
    rows: torch.Tensor
    """[P] int64: each pair's row, increasing within a group."""
    weights: torch.Tensor
    """[P] float32: each pair's weight."""
    rank: int | None
    """The largest rank of the G slots when all have one, else None (all of the slots' rows)."""
    key: tuple
    """(slots, rank): what the gathered weights depend on (serving.fast_lora.gather_cache)."""


@dataclass(frozen=True)
class StepPairs:
    """A step's pairs: `runs` one by one; the other rows `dense`, or their `loop` slots one by one and the rest in
    one `batch`."""

    runs: tuple[Run, ...]
    loop: tuple[SlotPairs, ...]
    batch: PairBatch | None
    mixture_rows: int
    """Rows of the step on a mixture id."""
    pairs: int
    """Pairs of the step, over all slots."""
    dense: DenseRows | None = None
    flat: FlatPairs | None = None
    """The pairs of `dense`, `loop`, `batch` and the short runs together, flat (None with more than FLAT_MAX_PAIRS
    outside runs, or with none)."""
    flat_runs: tuple[Run, ...] = ()
    """With `flat`: the runs it leaves out (longer than FLAT_RUN_MAX_PAIRS), multiplied as matmuls."""

    def flat_table(self) -> dict[tuple[int, int], float]:
        """Every pair as (row, slot) -> weight as the fused kernel's layout serves them (`flat` and `flat_runs`);
        equal to `table()` whenever `flat` is set (for tests and debugging)."""
        out = _runs_table(self.flat_runs)
        if self.flat is not None:
            f = self.flat
            for g, slot in enumerate(f.slots.tolist()):
                for p in range(int(f.starts[g]), int(f.starts[g + 1])):
                    out[(int(f.rows[p]), slot)] = float(f.weights[p])
        return out

    def table(self) -> dict[tuple[int, int], float]:
        """Every pair as (row, slot) -> weight, whichever part serves it (for tests and debugging)."""
        out = _runs_table(self.runs)
        for g in self.loop:
            rows = range(g.rows.start, g.rows.stop) if isinstance(g.rows, slice) else g.rows.tolist()
            weights = [1.0] * g.count if g.weights is None else g.weights.flatten().tolist()
            out.update({(row, g.slot): w for row, w in zip(rows, weights)})
        if self.batch is not None:
            b, w = self.batch, self.batch.width
            weights = [1.0] * b.rows.numel() if b.weights is None else b.weights.flatten().tolist()
            for i, slot in enumerate(b.slots.tolist()):
                for j in range(w):
                    if weights[i * w + j]:
                        out[(int(b.rows[i * w + j]), slot)] = weights[i * w + j]
        if self.dense is not None:
            d = self.dense
            rows = range(d.rows.start, d.rows.stop) if isinstance(d.rows, slice) else d.rows.tolist()
            for row, weights in zip(rows, d.weights.tolist()):
                out.update({(row, slot): w for slot, w in zip(d.slots.tolist(), weights) if w})
        return out


def _runs_table(runs: tuple[Run, ...]) -> dict[tuple[int, int], float]:
    return {(row, part.slot): part.weight for run in runs for part in run.parts
            for row in range(run.rows.start, run.rows.stop)}


NO_PAIRS = StepPairs((), (), None, 0, 0)


def step_pairs(indices: torch.Tensor, lora_index_to_id: list[int | None]) -> StepPairs:
    """The pairs of a step whose row r is on slot indices[r] ([T] int64; -1: no adapter): runs, then the other rows'
    pairs grouped by slot.

    Raises RuntimeError when a mixture id's expert is not in a slot, or the step has mixture ids of different
    unions (a mixture is only defined over its own union's members).
    """
    if indices.numel() == 0:
        return NO_PAIRS
    table = slot_table(lora_index_to_id)
    values, counts = torch.unique_consecutive(indices, return_counts=True)  # [V], [V]: segments of equal slot
    present = sorted({v for v in values.tolist() if v >= 0})
    if not present:
        return NO_PAIRS
    parts = _parts(present, table)
    runs, rest = [], torch.zeros_like(indices, dtype=torch.bool)  # rest: rows with an adapter outside runs
    start = 0
    for value, count in zip(values.tolist(), counts.tolist()):
        if value >= 0 and count >= RUN_MIN_ROWS:
            runs.append(Run(slice(start, start + count), count, parts[value], _scales(parts[value])))
        elif value >= 0:
            rest[start : start + count] = True
        start += count
    groups = _slot_pairs(indices, rest, parts, table.member_ranks)
    rows = rest.nonzero().flatten()  # [t] increasing
    dense = _dense(rows, groups) if _goes_dense(rows.numel(), groups) else None
    loop, batched = _split(groups) if dense is None else ([], [])
    mixture_rows = sum(int((indices == slot).sum()) for slot in present if slot in table.mixtures)
    pairs = sum(r.count * len(r.parts) for r in runs) + sum(g.count for g in groups)
    short = [r for r in runs if r.count * len(r.parts) <= FLAT_RUN_MAX_PAIRS]
    flat_rows = rest.clone()
    for run in short:
        flat_rows[run.rows] = True
    flat_groups = _slot_pairs(indices, flat_rows, parts, table.member_ranks) if short else groups
    flat = _flat(flat_groups) if flat_groups and sum(g.count for g in groups) <= FLAT_MAX_PAIRS else None
    flat_runs = tuple(r for r in runs if r.count * len(r.parts) > FLAT_RUN_MAX_PAIRS) if flat is not None else ()
    return StepPairs(tuple(runs), tuple(loop), _batch(batched), mixture_rows, pairs, dense, flat, flat_runs)


def _parts(present: list[int], table: SlotTable) -> dict[int, tuple[Part, ...]]:
    """Slot -> the parts a row on it multiplies by: its own slot at weight 1, or a mixture id's experts' slots."""
    mixtures = [slot for slot in present if slot in table.mixtures]
    member_slot: dict[int, int] = {}
    if mixtures:
        layouts = {table.mixtures[slot].layout for slot in mixtures}
        if len(layouts) > 1:
            raise RuntimeError(f"one step mixes mixture ids of {len(layouts)} different unions: "
                               f"{sorted(map(str, layouts))}")
        layout = layouts.pop()
        used = sorted({block for slot in mixtures for block, _ in table.mixtures[slot].blocks})
        found = {e: table.slot_of.get(mixture_ids.member_id(layout, e)) for e in used}
        missing = [e for e in used if found[e] is None]
        if missing:
            raise RuntimeError(f"mixture ids of union {layout} are in the step but its experts {missing} are not "
                               "in a slot: load and pin every member of the union first")
        member_slot = found
    out = {}
    for slot in present:
        if slot in table.mixtures:
            out[slot] = tuple(Part(member_slot[block], float(weight), table.member_ranks.get(member_slot[block]))
                              for block, weight in table.mixtures[slot].blocks)
        else:
            out[slot] = (Part(slot, 1.0, table.member_ranks.get(slot)),)
    return out


def _scales(parts: tuple[Part, ...]) -> torch.Tensor | None:
    """Run.scales of `parts` (several parts are a mixture's experts, each with its member block rank)."""
    if len(parts) == 1:
        return None
    return torch.cat([torch.full((p.rank,), p.weight) for p in parts])  # [Σr]


def _slot_pairs(indices: torch.Tensor, rest: torch.Tensor, parts: dict[int, tuple[Part, ...]],
                ranks: dict[int, int]) -> list[SlotPairs]:
    """The pairs of the `rest` rows ([T] bool), grouped by slot, in slot order."""
    rows_of: dict[int, list[torch.Tensor]] = {}
    weights_of: dict[int, list[torch.Tensor]] = {}
    for value in torch.unique(indices[rest]).tolist():
        rows = (rest & (indices == value)).nonzero().flatten()  # [t] increasing
        for part in parts[value]:
            rows_of.setdefault(part.slot, []).append(rows)
            weights_of.setdefault(part.slot, []).append(torch.full((rows.numel(),), part.weight))
    groups = []
    for slot in sorted(rows_of):
        rows, weights = torch.cat(rows_of[slot]), torch.cat(weights_of[slot])
        if len(rows_of[slot]) > 1:  # rows from several adapters or mixtures: back in increasing order
            rows, order = torch.sort(rows)
            weights = weights[order]
        groups.append(SlotPairs(slot, _rows(rows), rows.numel(),
                                None if bool((weights == 1).all()) else weights.unsqueeze(1), ranks.get(slot)))
    return groups


def _rows(rows: torch.Tensor) -> Rows:
    """Increasing row indices [t] as a slice when they are contiguous."""
    first, last = int(rows[0]), int(rows[-1])
    return slice(first, last + 1) if last - first + 1 == rows.numel() else rows


def _indices(rows: Rows) -> torch.Tensor:
    """Rows as an index tensor `[t]`."""
    return torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows


def _split(groups: list[SlotPairs]) -> tuple[list[SlotPairs], list[SlotPairs]]:
    """(loop, batch): the slots with the most pairs loop while padding all the rest to the largest count would
    exceed MAX_PADDING; a lone slot left loops too."""
    by_count = sorted(groups, key=lambda g: g.count, reverse=True)
    k = 0
    while len(by_count) - k >= 2:
        rest = by_count[k:]
        if len(rest) * rest[0].count <= MAX_PADDING * sum(g.count for g in rest):
            break
        k += 1
    if len(by_count) - k < 2:
        k = len(by_count)
    return sorted(by_count[:k], key=lambda g: g.slot), sorted(by_count[k:], key=lambda g: g.slot)


def _batch(groups: list[SlotPairs]) -> PairBatch | None:
    """The batched layout of `groups` (None for none)."""
    if not groups:
        return None
    width = max(g.count for g in groups)
    rows = torch.empty(len(groups), width, dtype=torch.long)  # [G, width]
    weights = torch.zeros(len(groups), width)  # [G, width]; padding: 0
    for i, g in enumerate(groups):
        r = _indices(g.rows)  # [count]
        rows[i, : g.count] = r
        rows[i, g.count :] = r[0]
        weights[i, : g.count] = 1.0 if g.weights is None else g.weights.flatten()
    padded = any(g.count < width for g in groups)
    unweighted = not padded and all(g.weights is None for g in groups)
    ranks = [g.rank for g in groups]
    rank = None if None in ranks else max(ranks)
    slots = tuple(g.slot for g in groups)
    return PairBatch(torch.tensor(slots, dtype=torch.long), rows.view(-1), None if unweighted else weights.view(-1, 1),
                     width, rank, (slots, rank))


def _flat(groups: list[SlotPairs]) -> FlatPairs:
    """The flat layout of `groups` (in slot order)."""
    counts = [g.count for g in groups]
    starts = torch.zeros(len(groups) + 1, dtype=torch.long)
    starts[1:] = torch.tensor(counts).cumsum(0)
    rows = torch.cat([_indices(g.rows) for g in groups])  # [P]
    weights = torch.cat([torch.ones(g.count) if g.weights is None else g.weights.flatten() for g in groups])
    ranks = [g.rank for g in groups]
    rank = None if None in ranks else max(ranks)
    slots = tuple(g.slot for g in groups)
    return FlatPairs(torch.tensor(slots, dtype=torch.long), starts,
                     torch.tensor([-1 if r is None else r for r in ranks], dtype=torch.long), rows,
                     weights.to(torch.float32).contiguous(), rank, (slots, rank))


def _goes_dense(t: int, groups: list[SlotPairs]) -> bool:
    """Whether t rows with the pairs `groups` multiply densely (DENSE_MIN_PAIRS_PER_ROW, DENSE_MAX_ROWS,
    DENSE_CELLS_PER_PAIR)."""
    pairs = sum(g.count for g in groups)
    return (pairs > DENSE_MIN_PAIRS_PER_ROW * t and t <= DENSE_MAX_ROWS
            and t * len(groups) <= DENSE_CELLS_PER_PAIR * pairs)


def _dense(rows: torch.Tensor, groups: list[SlotPairs]) -> DenseRows:
    """The dense layout of `groups` (in slot order) over `rows` ([t] increasing: every row with a pair in them)."""
    position = torch.full((int(rows[-1]) + 1,), -1, dtype=torch.long)  # row -> its index among `rows`
    position[rows] = torch.arange(rows.numel())
    weights = torch.zeros(rows.numel(), len(groups))  # [t, G]
    for g_index, g in enumerate(groups):
        weights[position[_indices(g.rows)], g_index] = 1.0 if g.weights is None else g.weights.flatten()
    ranks = [g.rank for g in groups]
    rank = None if None in ranks else max(ranks)
    slots = tuple(g.slot for g in groups)
    return DenseRows(_rows(rows), torch.tensor(slots, dtype=torch.long), weights, rank, (slots, rank))
