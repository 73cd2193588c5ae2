"""Mixture LoRA ids: a mixture's weights written into the one integer vLLM passes to the LoRA ops.

The only per-request datum that reaches a punica wrapper is the request's LoRA id. To serve a
mixture `Σᵢ wᵢ sᵢ BᵢAᵢ` of E experts without building a composite, the serving side loads and
pins every expert under a **member id** (member i of its union), and gives each mixture a
**mixture id** that encodes its weights. The wrapper finds the slots of the experts a step uses
and scales their rank blocks per token (serving.fast_lora.ops.pair_lora_linear). A member id is
also an ordinary adapter: a request for one expert uses it as is. Ids without the tag bit are
other adapters.

Two forms, chosen by the union's size and grid (`UnionLayout.sized`):
- **dense** (E ≤ 63, while the C(n + R - 1, R - 1) weight vectors of n units over R routed experts fit
  32 bits: R ≤ 16 on the grid 1/20): any weight vector on the grid, over all routed experts;
- **sparse** (up to E = 1023): at most two routed experts with a non-zero weight (the gate's top-1 and
  top-2 mixtures); other mixtures of such a union are served as composites.

Layout of an id (a positive int64, as vLLM stores LoRA ids):

    bit 62        tag: 1 for mixture and member ids (mode-cotd's other ids are below 2⁴⁹)
    bit 61        sparse: the form
    bits 54–60    family: 7 bits of the union's digest, so ids of different unions never match
    bit 53        shared: 1 when the union's last block is a shared adapter (a bundle's `manifest.shared`),
                  applied at weight 1 under every mixture of the union
    dense         bits 47–52 E (1–63), bits 39–46 b, bits 32–38 n, bits 0–31 code
    sparse        bits 43–52 E (1–1023), bits 35–42 b, bits 28–34 n, bits 0–27 code

    E             the number of experts in the union
    b             the rank of each expert's block (1–255)
    n             grid units per 1 (1–127); 0 marks a member id
    code          member: its index i (0 … E-1)
                  dense mixture: the rank of its units (u₁, …, u_R) over the union's routed experts (all
                  E, or the first E-1 when shared), uᵢ ≥ 0, Σuᵢ = n, wᵢ = uᵢ / n
                  (mode_cotd.mixture.rank_units: colexicographic, stars and bars)
                  sparse mixture: i | j << 10 | u << 20 with routed experts i ≤ j: i = j is expert i at
                  weight 1 (u = n); i < j is u/n on i and (n-u)/n on j, 0 < u < n

Block weights of a mixture id: (u₁/n, …, u_E/n), or (u₁/n, …, u_{E-1}/n, 1) in a shared union, so that
ΔW = ΔW_shared + Σᵢ wᵢ ΔWᵢ.

Only non-negative weights that sum to 1 on the grid are encodable (the gate's mixtures always
are; mode_cotd.mixture.Mixture.units_on gives their units over a union's experts); anything
else (`encode` returns None) is served as a composite.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from mode_cotd.mixture import count_units, rank_units, unrank_units

TAG = 1 << 62
_SPARSE, _FAMILY, _SHARED = 61, 54, 53
MAX_BLOCK_RANK, MAX_UNITS, MAX_FAMILY = 255, 127, 127
MAX_DENSE_EXPERTS, MAX_EXPERTS = 63, 1023
MAX_SPARSE_WEIGHTS = 2
"""Routed experts with a non-zero weight that a sparse mixture id can carry."""
_INDEX_BITS = 10


@dataclass(frozen=True)
class _Form:
    """Where E, b, n and the code sit in an id of one form."""

    e_shift: int
    e_bits: int
    b_shift: int
    n_shift: int

    @property
    def code_mask(self) -> int:
        return (1 << self.n_shift) - 1


_DENSE, _SPARSE_FORM = _Form(47, 6, 39, 32), _Form(43, 10, 35, 28)


@dataclass(frozen=True)
class UnionLayout:
    """Which union a mixture id refers to, and how its rank blocks are laid out."""

    family: int
    """7 bits of the union's digest (0–127)."""
    experts: int
    """E: rank blocks in the union, one per expert, in the union's order."""
    block_rank: int
    """b: rows of A (columns of B) per block; the union's rank is E·b."""
    shared: bool = False
    """True: block E-1 is a shared adapter at weight 1 under every mixture; mixtures weigh blocks 0 … E-2."""
    sparse: bool = False
    """The id form: False dense (E ≤ 63, any weights), True sparse (E ≤ 1023, at most two routed weights)."""

    def __post_init__(self) -> None:
        if not 0 <= self.family <= MAX_FAMILY:
            raise ValueError(f"family must be in 0..{MAX_FAMILY}, got {self.family}")
        most = MAX_EXPERTS if self.sparse else MAX_DENSE_EXPERTS
        if not 1 + self.shared <= self.experts <= most:
            raise ValueError(f"a {'sparse' if self.sparse else 'dense'} union holds {1 + self.shared}..{most} "
                             f"experts, got {self.experts}"
                             + (" (a shared one and at least one routed)" if self.shared else ""))
        if not 1 <= self.block_rank <= MAX_BLOCK_RANK:
            raise ValueError(f"block rank must be in 1..{MAX_BLOCK_RANK}, got {self.block_rank}")

    @classmethod
    def sized(cls, family: int, experts: int, block_rank: int, shared: bool = False,
              grid_units: int = 20) -> UnionLayout:
        """The layout of a union of `experts` whose mixtures lie on the grid 1/grid_units: dense while every
        weight vector on that grid has a code (at most 63 experts; 16 routed ones on the grid 1/20), sparse above."""
        dense = experts <= MAX_DENSE_EXPERTS and count_units(grid_units, experts - shared) <= _DENSE.code_mask + 1
        return cls(family, experts, block_rank, shared, sparse=not dense)

    @property
    def rank(self) -> int:
        return self.experts * self.block_rank

    @property
    def routed(self) -> int:
        """R: the blocks a mixture weighs (E, or E-1 when the last is shared)."""
        return self.experts - self.shared

    @property
    def _form(self) -> _Form:
        return _SPARSE_FORM if self.sparse else _DENSE


@dataclass(frozen=True)
class MixtureCode:
    """A decoded mixture id: the union it uses and the units of each routed expert with a non-zero weight."""

    layout: UnionLayout
    entries: tuple[tuple[int, int], ...]
    """(routed expert index, uᵢ) for each uᵢ ≠ 0, by index; Σuᵢ = n."""
    n: int
    """Grid units per 1: wᵢ = uᵢ / n."""

    @property
    def blocks(self) -> tuple[tuple[int, float], ...]:
        """(block, scale) for every block with a non-zero scale: wᵢ = uᵢ / n, then (E-1, 1.0) for a shared block."""
        shared = ((self.layout.experts - 1, 1.0),) if self.layout.shared else ()
        return tuple((i, u / self.n) for i, u in self.entries) + shared

    @property
    def units(self) -> tuple[int, ...]:
        """uᵢ for every routed expert (layout.routed of them, zeros included)."""
        units = [0] * self.layout.routed
        for i, u in self.entries:
            units[i] = u
        return tuple(units)

    @property
    def weights(self) -> tuple[float, ...]:
        """The E block scales: wᵢ = uᵢ / n as floats, then 1.0 for a shared block."""
        return tuple(u / self.n for u in self.units) + ((1.0,) if self.layout.shared else ())


@dataclass(frozen=True)
class MemberCode:
    """A decoded member id: expert `index` of its union."""

    layout: UnionLayout
    index: int


def _header(layout: UnionLayout, n: int) -> int:
    form = layout._form
    return (TAG | int(layout.sparse) << _SPARSE | layout.family << _FAMILY | int(layout.shared) << _SHARED
            | layout.experts << form.e_shift | layout.block_rank << form.b_shift | n << form.n_shift)


def member_id(layout: UnionLayout, index: int) -> int:
    """The id expert `index` (0 … E-1) of the union is loaded and pinned under."""
    if not 0 <= index < layout.experts:
        raise ValueError(f"member index {index} outside 0..{layout.experts - 1}")
    return _header(layout, 0) | index


def encode(layout: UnionLayout, units: list[int] | tuple[int, ...], n: int) -> int | None:
    """The mixture id of weights uᵢ/n over the layout's routed experts, or None when they cannot be encoded
    (negative, not summing to n, too many experts or weight vectors for the form)."""
    if len(units) != layout.routed or not 1 <= n <= MAX_UNITS or any(u < 0 for u in units) or sum(units) != n:
        return None
    if layout.sparse:
        used = [i for i, u in enumerate(units) if u]
        if len(used) > MAX_SPARSE_WEIGHTS:
            return None
        i, j = used[0], used[-1]
        return _header(layout, n) | i | j << _INDEX_BITS | units[i] << 2 * _INDEX_BITS
    if count_units(n, layout.routed) > _DENSE.code_mask + 1:
        return None
    return _header(layout, n) | rank_units(units)


@functools.lru_cache(maxsize=4096)
def decode(lora_id: int) -> MemberCode | MixtureCode | None:
    """A mixture id -> MixtureCode, a member id -> MemberCode, anything else -> None (cached: ids are values)."""
    if lora_id <= 0 or not lora_id & TAG or lora_id >> 63:
        return None
    sparse, shared = bool(lora_id >> _SPARSE & 1), bool(lora_id >> _SHARED & 1)
    form = _SPARSE_FORM if sparse else _DENSE
    experts, block_rank = (lora_id >> form.e_shift) & ((1 << form.e_bits) - 1), (lora_id >> form.b_shift) & 0xFF
    if experts < 1 + shared or block_rank < 1:
        return None
    layout = UnionLayout((lora_id >> _FAMILY) & MAX_FAMILY, experts, block_rank, shared, sparse)
    n, code = (lora_id >> form.n_shift) & MAX_UNITS, lora_id & form.code_mask
    if n == 0:
        return MemberCode(layout, code) if code < layout.experts else None
    if not sparse:
        units = unrank_units(code, n, layout.routed)
        return MixtureCode(layout, tuple((i, u) for i, u in enumerate(units) if u), n)
    mask = (1 << _INDEX_BITS) - 1
    i, j, u = code & mask, code >> _INDEX_BITS & mask, code >> 2 * _INDEX_BITS
    if not i <= j < layout.routed or (i == j) != (u == n) or not 0 < u <= n:
        return None
    return MixtureCode(layout, ((i, n),) if i == j else ((i, u), (j, n - u)), n)
