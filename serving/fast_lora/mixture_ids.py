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
    bits 55–61    family: 7 bits of the union's digest, so ids of different unions never match
    bit 54        shared: 1 when the union's last block is a shared adapter (a bundle's `manifest.shared`),
                  applied at weight 1 under every mixture of the union
    bits 48–53    E, the number of experts in the union (1–63)
    bits 40–47    b, the rank of each expert's block (1–255)
    bits 33–39    n, grid units per 1 (1–127); 0 marks a member id
    bits 0–32     mixture: which weight vector, the mixture's id over the union's routed experts
                  (all E, or the first E-1 when shared): the rank of its units (u₁, …, u_R), uᵢ ≥ 0,
                  Σuᵢ = n, wᵢ = uᵢ / n (mode_cotd.mixture.rank_units: colexicographic, stars and bars);
                  member: its index i (0 … E-1)

Block weights of a mixture id: (u₁/n, …, u_E/n), or (u₁/n, …, u_{E-1}/n, 1) in a shared union, so that
ΔW = ΔW_shared + Σᵢ wᵢ ΔWᵢ.

Only non-negative weights that sum to 1 on the grid are encodable (the gate's mixtures always
are; mode_cotd.mixture.Mixture.units_on gives their units over a union's experts); anything
else (`encode` returns None) is served as a composite.
"""

from __future__ import annotations

from dataclasses import dataclass

from mode_cotd.mixture import count_units, rank_units, unrank_units

TAG = 1 << 62
_FAMILY, _SHARED, _E, _B, _N = 55, 54, 48, 40, 33
_CODE_BITS = 33
MAX_EXPERTS, MAX_BLOCK_RANK, MAX_UNITS, MAX_FAMILY = 63, 255, 127, 127


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

    def __post_init__(self) -> None:
        if not 0 <= self.family <= MAX_FAMILY:
            raise ValueError(f"family must be in 0..{MAX_FAMILY}, got {self.family}")
        if not 1 + self.shared <= self.experts <= MAX_EXPERTS:
            raise ValueError(f"a union holds {1 + self.shared}..{MAX_EXPERTS} experts, got {self.experts}"
                             + (" (a shared one and at least one routed)" if self.shared else ""))
        if not 1 <= self.block_rank <= MAX_BLOCK_RANK:
            raise ValueError(f"block rank must be in 1..{MAX_BLOCK_RANK}, got {self.block_rank}")

    @property
    def rank(self) -> int:
        return self.experts * self.block_rank

    @property
    def routed(self) -> int:
        """R: the blocks a mixture weighs (E, or E-1 when the last is shared)."""
        return self.experts - self.shared


@dataclass(frozen=True)
class MixtureCode:
    """A decoded mixture id: the union it uses and one weight per expert block."""

    layout: UnionLayout
    units: tuple[int, ...]
    """uᵢ ≥ 0 per routed expert (layout.routed of them), Σuᵢ = n."""
    n: int
    """Grid units per 1: wᵢ = uᵢ / n."""

    @property
    def weights(self) -> tuple[float, ...]:
        """The E block scales: wᵢ = uᵢ / n as floats, then 1.0 for a shared block."""
        return tuple(u / self.n for u in self.units) + ((1.0,) if self.layout.shared else ())


def _header(layout: UnionLayout, n: int) -> int:
    return (TAG | layout.family << _FAMILY | int(layout.shared) << _SHARED | layout.experts << _E
            | layout.block_rank << _B | n << _N)


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
    """The mixture id of weights uᵢ/n over the layout's routed experts, or None when they cannot be encoded
    (negative, not summing to n, too many)."""
    if len(units) != layout.routed or not 1 <= n <= MAX_UNITS or any(u < 0 for u in units) or sum(units) != n:
        return None
    if count_units(n, layout.routed) > 1 << _CODE_BITS:
        return None
    return _header(layout, n) | rank_units(units)


def decode(lora_id: int) -> MemberCode | MixtureCode | None:
    """A mixture id -> MixtureCode, a member id -> MemberCode, anything else -> None."""
    if lora_id <= 0 or not lora_id & TAG or lora_id >> 63:
        return None
    shared = bool(lora_id >> _SHARED & 1)
    experts, block_rank = (lora_id >> _E) & 0x3F, (lora_id >> _B) & 0xFF
    if experts < 1 + shared or block_rank < 1:
        return None
    layout = UnionLayout((lora_id >> _FAMILY) & MAX_FAMILY, experts, block_rank, shared)
    n = (lora_id >> _N) & 0x7F
    if n == 0:
        index = lora_id & ((1 << _CODE_BITS) - 1)
        return MemberCode(layout, index) if index < layout.experts else None
    return MixtureCode(layout, unrank_units(lora_id & ((1 << _CODE_BITS) - 1), n, layout.routed), n)

