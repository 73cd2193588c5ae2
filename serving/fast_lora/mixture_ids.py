"""Mixture LoRA ids: a mixture's weights written into the one integer vLLM passes to the LoRA ops.

The only per-request datum that reaches a punica wrapper is the request's LoRA id. To serve a
mixture `Σᵢ wᵢ sᵢ BᵢAᵢ` of E experts without building a composite, the serving side loads and
pins every expert under a **member id** (member i of its union), and gives each mixture a
**mixture id** that encodes its weights. The wrapper finds the members' slots, views them as
one union (`A = cat(Aᵢ)`, `B = cat(sᵢBᵢ)`, rank E·b, block i = expert i's rank b) and scales
the rank blocks per token (serving.fast_lora.ops.union_lora_linear). A member id is also an
ordinary adapter: a request for one expert uses it as is. Ids without the tag bit are other
adapters.

Layout of an id (a positive int64, as vLLM stores LoRA ids):

    bit 62        tag: 1 for mixture and member ids (mode-cotd's other ids are below 2⁴⁹)
    bits 54–61    family: 8 bits of the union's digest, so ids of different unions never match
    bits 48–53    E, the number of experts in the union (1–63)
    bits 40–47    b, the rank of each expert's block (1–255)
    bits 33–39    n, grid units per 1 (1–127); 0 marks a member id
    bits 0–32     mixture: which weight vector, the mixture's id over the union's experts: the rank
                  of its units (u₁, …, u_E), uᵢ ≥ 0, Σuᵢ = n, wᵢ = uᵢ / n
                  (mode_cotd.mixture.rank_units: colexicographic, stars and bars);
                  member: its index i (0 … E-1)

Only non-negative weights that sum to 1 on the grid are encodable (the gate's mixtures always
are; mode_cotd.mixture.Mixture.units_on gives their units over a union's experts); anything
else (`encode` returns None) is served as a composite.
"""

from __future__ import annotations

from dataclasses import dataclass

from mode_cotd.mixture import count_units, rank_units, unrank_units

TAG = 1 << 62
_FAMILY, _E, _B, _N = 54, 48, 40, 33
_CODE_BITS = 33
MAX_EXPERTS, MAX_BLOCK_RANK, MAX_UNITS = 63, 255, 127


@dataclass(frozen=True)
class UnionLayout:
    """Which union a mixture id refers to, and how its rank blocks are laid out."""

    family: int
    """8 bits of the union's digest (0–255)."""
    experts: int
    """E: rank blocks in the union, one per expert, in the union's order."""
    block_rank: int
    """b: rows of A (columns of B) per block; the union's rank is E·b."""

    def __post_init__(self) -> None:
        if not 0 <= self.family <= 255:
            raise ValueError(f"family must be in 0..255, got {self.family}")
        if not 1 <= self.experts <= MAX_EXPERTS:
            raise ValueError(f"a union holds 1..{MAX_EXPERTS} experts, got {self.experts}")
        if not 1 <= self.block_rank <= MAX_BLOCK_RANK:
            raise ValueError(f"block rank must be in 1..{MAX_BLOCK_RANK}, got {self.block_rank}")

    @property
    def rank(self) -> int:
        return self.experts * self.block_rank


@dataclass(frozen=True)
class MixtureCode:
    """A decoded mixture id: the union it uses and one weight per expert block."""

    layout: UnionLayout
    units: tuple[int, ...]
    """uᵢ ≥ 0 per expert, Σuᵢ = n."""
    n: int
    """Grid units per 1: wᵢ = uᵢ / n."""

    @property
    def weights(self) -> tuple[float, ...]:
        """wᵢ = uᵢ / n as floats: the block scales."""
        return tuple(u / self.n for u in self.units)


def _header(layout: UnionLayout, n: int) -> int:
    return TAG | layout.family << _FAMILY | layout.experts << _E | layout.block_rank << _B | n << _N


@dataclass(frozen=True)
class MemberCode:
    """A decoded member id: expert `index` of its union."""

    layout: UnionLayout
    index: int


def member_id(layout: UnionLayout, index: int) -> int:
    """The id expert `index` (0 … E-1) of the union is loaded and pinned under."""
    if not 0 <= index < layout.experts:
        raise ValueError(f"member index {index} outside 0..{layout.experts - 1}")
    return _header(layout, 0) | index


def encode(layout: UnionLayout, units: list[int] | tuple[int, ...], n: int) -> int | None:
    """The mixture id of weights uᵢ/n, or None when they cannot be encoded (negative, not summing to n, too many)."""
    if len(units) != layout.experts or not 1 <= n <= MAX_UNITS or any(u < 0 for u in units) or sum(units) != n:
        return None
    if count_units(n, layout.experts) > 1 << _CODE_BITS:
        return None
    return _header(layout, n) | rank_units(units)


def decode(lora_id: int) -> MemberCode | MixtureCode | None:
    """A mixture id -> MixtureCode, a member id -> MemberCode, anything else -> None."""
    if lora_id <= 0 or not lora_id & TAG or lora_id >> 63:
        return None
    layout = UnionLayout((lora_id >> _FAMILY) & 0xFF, (lora_id >> _E) & 0x3F, (lora_id >> _B) & 0xFF)
    n = (lora_id >> _N) & 0x7F
    if n == 0:
        index = lora_id & ((1 << _CODE_BITS) - 1)
        return MemberCode(layout, index) if index < layout.experts else None
    return MixtureCode(layout, unrank_units(lora_id & ((1 << _CODE_BITS) - 1), n, layout.experts), n)

