"""Mixtures without composites: the bundle's experts pinned in vLLM as one union, mixtures as ids.

With mode-cotd's grouped LoRA ops (serving/fast_lora), a mixture Σᵢ wᵢ sᵢBᵢAᵢ of the bundle's
experts needs no composite adapter (docs/performance.md, "Mixtures"):

- every expert is loaded once and pinned under its **member id** (serving.fast_lora.mixture_ids),
  so it never leaves its slot; a request for one expert uses it directly;
- a mixture whose weights are units ≥ 0 of the union's grid summing to 1 (every gate mixture;
  `Mixture.units_on`, exact integers) gets a **mixture id** that encodes them, pointing at a tiny placeholder adapter (vLLM gives every distinct id a
  slot and loads its folder; the wrapper never reads that slot); the wrapper serves it from the
  members' slots with per-token block scales, exactly;
- any other mixture (negative weights, weights not summing to 1, "linear" mode) is left to the
  composite cache (`target` returns None).

A bundle with a shared adapter (`manifest.shared`) puts it last in the union and sets the layout's
shared bit: every mixture id then weighs the routed experts on the grid and adds the shared block at
weight 1 (ΔW = ΔW_shared + Σᵢ wᵢ ΔWᵢ). `target` takes the mixture as the route serves it, shared
included (mode_cotd.routes.with_shared), and encodes it only when the shared weight is exactly 1.

Eligible bundles: LoRA only on linear modules (no embedding or lm_head LoRA, which the union
path does not apply), at most 1,023 experts, each of rank at most the engine's max LoRA rank. A union
of up to 16 routed experts (on the grid 1/20) takes dense mixture ids, any weight vector on the grid;
a larger one sparse ids, the mixtures of one or two routed experts (the gate's top-2), the others
served as composites (serving.fast_lora.mixture_ids). The
union's block rank b is the largest expert rank: vLLM zeroes a slot before it loads an adapter
into it (`reset_lora`), so a smaller expert's rows past its rank are zero and its block computes
exactly its own sᵢBᵢAᵢ (an r8 all_data under r16 residuals costs 8 zero rows per token, nothing else).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mode_cotd.adapter import adapter_from_modules, file_checksums, load_adapter, save_adapter
from mode_cotd.errors import ModeCotdError
from mode_cotd.mixture import Mixture
from mode_cotd.routes import expert_adapter, mixture_adapter
from serving.fast_lora import mixture_ids
from serving.fast_lora.mixture_ids import UnionLayout
from serving.protocol import AdapterSpec, LoraTarget
from serving.sealed import check_seal, seal

logger = logging.getLogger(__name__)

PLACEHOLDER = "mixture-placeholder-r1"
"""Folder (under the composite cache dir) of the adapter every mixture id points at: rank 1, all zero."""
UNSUPPORTED_MODULES = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class MixtureUnion:
    """The bundle's experts as one union: member targets to pin, and mixture ids for requests."""

    layout: UnionLayout
    """Family (a digest of the experts' files), E and the experts' rank b."""
    names: tuple[str, ...]
    """Expert names in union order (routed experts sorted, then the shared one): expert i is block i."""
    members: tuple[LoraTarget, ...]
    """One target per expert, under its member id: pinned when the engine starts."""
    placeholder: Path
    """The placeholder adapter folder of mixture ids."""
    grid_units: int
    """n: mixture weights are multiples of 1/n (the route table's grid)."""
    shared: str | None = None
    """The shared adapter (the last block, weight 1 under every mixture id), or None."""

    @classmethod
    def for_experts(cls, experts: dict[str, Path], cache_dir: Path, grid_units: int,
                    max_lora_rank: int, shared: str | None = None, sparse: bool | None = None,
                    known: Mapping[str, ExpertFacts] | None = None) -> MixtureUnion | None:
        """The union of `experts` (`shared`, one of them, last), writing the placeholder if needed; None (logged)
        when they are not eligible. `sparse`: the mixture ids' form (None: by the union's size,
        UnionLayout.sized; True: sparse ids even for a small union, False: dense ids, where they fit).
        `known`: the facts of experts already read and verified (a loaded bundle's records), so their folders are
        not read again (a thousand experts took ~30 s here); the others are read from their folders."""
        if shared is not None and shared not in experts:
            raise ValueError(f"the shared adapter {shared!r} is not one of the experts {sorted(experts)}")
        names = tuple(sorted(n for n in experts if n != shared)) + ((shared,) if shared is not None else ())
        if len(names) < 1 + (shared is not None) or len(names) > mixture_ids.MAX_EXPERTS \
                or not 1 <= grid_units <= mixture_ids.MAX_UNITS:
            logger.info("mixture union off: %d experts, grid of %d units", len(names), grid_units)
            return None
        facts = {}
        for name in names:  # one at a time: a union of a thousand experts is never in memory at once
            facts[name] = (known or {}).get(name) or ExpertFacts.read(experts[name])
            why = _ineligible(name, facts[name], max_lora_rank)
            if why:
                logger.warning("mixture union off, mixtures are served as composites: %s", why)
                return None
        rank = max(f.rank for f in facts.values())  # b: smaller experts' blocks end in zero rows
        digest = hashlib.sha256()
        for name in names:
            digest.update(name.encode("utf-8") + b"\0")
            for file, sha in sorted(facts[name].files.items()):
                digest.update(f"{file}={sha}\n".encode())
        layout = UnionLayout.sized(digest.digest()[0] & mixture_ids.MAX_FAMILY, len(names), rank,
                                   shared is not None, grid_units)
        if sparse is not None and sparse != layout.sparse:
            layout = dataclasses.replace(layout, sparse=sparse)  # ValueError: too many experts for dense ids
        members = tuple(LoraTarget(expert_adapter(name), mixture_ids.member_id(layout, i), str(experts[name]))
                        for i, name in enumerate(names))
        placeholder = _write_placeholder(Path(cache_dir), experts[names[0]])
        return cls(layout, names, members, placeholder, grid_units, shared)

    def member(self, expert: str) -> LoraTarget | None:
        """The pinned target of one expert (None: not an expert of the union)."""
        return self.members[self.names.index(expert)] if expert in self.names else None

    def target(self, spec: AdapterSpec) -> LoraTarget | None:
        """The mixture id target of `spec`, or None when the union cannot serve it (left to composites)."""
        if spec.mode != "exact":
            return None
        mixture = spec.mixture
        if self.shared is not None:  # the shared adapter at exactly weight 1, the rest on the routed experts
            units = dict(zip(mixture.experts, mixture.units))
            if units.pop(self.shared, None) != mixture.n or not units:
                return None
            mixture = Mixture.from_units(units, mixture.n)
        units = mixture.units_on(self.names[:self.layout.routed], self.grid_units)  # None: off the grid, ...
        lora_id = None if units is None else mixture_ids.encode(self.layout, units, self.grid_units)
        if lora_id is None:
            return None
        return LoraTarget(mixture_adapter(spec.mixture), lora_id, str(self.placeholder))


@dataclass(frozen=True)
class ExpertFacts:
    """What the union needs of one expert."""

    rank: int
    """Its LoRA rank r."""
    target_modules: tuple[str, ...]
    """The modules it adapts."""
    files: dict[str, str]
    """sha256 of each of its files (relative path -> hex digest): the union's family digest is made of them."""

    @classmethod
    def read(cls, folder: Path) -> ExpertFacts:
        """The facts of the adapter in `folder` (read and checked: mode_cotd.adapter.load_adapter)."""
        adapter = load_adapter(folder)
        return cls(adapter.r, tuple(adapter.target_modules), file_checksums(folder))


def _ineligible(name: str, facts: ExpertFacts, max_lora_rank: int) -> str | None:
    """Why this expert cannot be in a union, or None."""
    if facts.rank > min(max_lora_rank, mixture_ids.MAX_BLOCK_RANK):
        return f"expert {name!r} has rank {facts.rank}, over the engine's max LoRA rank {max_lora_rank}"
    bad = sorted(set(facts.target_modules) & set(UNSUPPORTED_MODULES))
    if bad:
        return f"expert {name!r} has LoRA on {bad}, which the union does not apply"
    return None


def _write_placeholder(cache_dir: Path, expert: Path) -> Path:
    """A rank-1 all-zero adapter on one of the modules of the adapter in `expert` (checksummed; rewritten when
    damaged)."""
    folder = cache_dir / PLACEHOLDER
    try:
        check_seal(folder)
        return folder
    except (OSError, ValueError, ModeCotdError):  # missing or damaged: write it again
        pass
    like = load_adapter(expert)
    path, (a, b) = next(iter(like.modules().items()))
    module = {path: (torch.zeros(1, a.shape[1]), torch.zeros(b.shape[0], 1))}  # A [1, in], B [out, 1]
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_adapter(adapter_from_modules(module, 1, 1.0, False, like.base_model_name_or_path), folder)
    seal(folder)
    return folder
