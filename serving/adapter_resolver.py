"""Which adapter serves a request, and the LoRA target (name, id, path) vLLM loads for it.

    one expert at weight 1          its pinned member id (with a union), else its bundle folder  "expert"
    a mixture the union encodes     a mixture id over the union's placeholder (serving.mixture_union) "union"
    any other mixture, or "linear"  a composite, named by mode_cotd.routes.composite_folder        "composite"

In a bundle with a shared adapter (`manifest.shared`), every exact spec is first put on top of
it (mode_cotd.routes.with_shared: the shared adapter at weight 1), so one expert, a gate
mixture or an explicit one is served as student + shared + the route's experts; the shared
adapter alone is its own expert. A linear spec stays as it is: its composite is the linear
merge of its experts plus the shared adapter, exactly (mode_cotd.mixing.mix, the adapter cache).

Runtime experts (loaded through /v1/load_lora_adapter, serving/runtime_routes.py) are served from their
folder in the state folder under their own LoRA name (`set_runtime`), one per load, so an expert loaded
again with new weights never reuses the old one's vLLM slot or composites. Those in the state when the
engine started are in the union (serving.components.student_service); one loaded later is served from
its own folder, and a mixture with it as a composite, until the next start.

The resolver decides; it builds nothing. A composite's folder is built, cached and evicted by
serving.adapter_cache, which asks the resolver first.

Targets: names come from mode_cotd.routes (expert-<name>, composite-<folder>, mixture-<digest>);
LoRA ids are stable, derived from the name (a hash), the same across restarts and replicas (a
collision is an error); paths are confined: experts under `roots` (the bundle), composites under
the cache dir. Anything else is refused before vLLM sees it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from mode_cotd.bundle import shared_in_linear
from mode_cotd.errors import ConfigError
from mode_cotd.routes import composite_adapter, composite_folder, expert_adapter, with_shared
from serving.errors import InternalError, InvalidMixture
from serving.mixture_union import MixtureUnion
from serving.protocol import AdapterSpec, LoraTarget

logger = logging.getLogger(__name__)


def stable_lora_id(name: str) -> int:
    """A positive id from the adapter's name: the first 6 bytes of its sha256, plus 1."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:6], "big") + 1


@dataclass(frozen=True)
class RuntimeTarget:
    """A runtime expert as the student serves it (mode_cotd.runtime_state.RuntimeExpert, reduced)."""

    lora_name: str
    """Its LoRA name, unique per load ("runtime-<name>-<digest>"): its vLLM id follows from it."""
    path: str
    """Its folder in the state folder."""


@dataclass(frozen=True)
class Resolved:
    """What serves one adapter spec."""

    outcome: str
    """"expert" (a member id or its own folder), "union" (a mixture id over the pinned experts) or "composite"."""
    target: LoraTarget | None = None
    """What vLLM loads; None for a composite, which the adapter cache gets ready first."""
    key: str | None = None
    """A composite's folder name under the cache dir (its cache key); None otherwise."""
    spec: AdapterSpec | None = None
    """What is served: the spec asked for, on top of the shared adapter where the bundle has one."""


class AdapterResolver:
    """Adapter specs -> what serves them, for one bundle's experts (see the module docstring)."""

    def __init__(self, experts: dict[str, Path], cache_dir: Path, max_lora_rank: int,
                 roots: list[Path] | None = None, union: MixtureUnion | None = None, shared: str | None = None,
                 union_runtime: dict[str, RuntimeTarget] | None = None):
        if shared is not None and shared not in experts:
            raise ConfigError(f"the shared adapter {shared!r} is not one of the experts {sorted(experts)}")
        if union is not None and union.shared != shared:
            raise ConfigError(f"the mixture union's shared adapter {union.shared!r} is not the bundle's {shared!r}")
        self.shared = shared
        self.experts = {name: Path(path) for name, path in experts.items()}
        self.cache_dir = Path(cache_dir)
        self.max_lora_rank = max_lora_rank
        self.roots = [Path(r).resolve() for r in roots] if roots is not None else None
        if self.roots is not None:
            outside = {n: str(p) for n, p in self.experts.items() if not _inside(p, self.roots)}
            if outside:
                raise ConfigError(f"expert folders outside the bundle {[str(r) for r in self.roots]}: {outside}")
        self.union = union
        self._ids: dict[int, str] = {}
        self._bundle_experts = set(self.experts)
        self.runtime: dict[str, RuntimeTarget] = {}
        """Runtime experts (serving/runtime_routes.py): name -> its LoRA name and folder."""
        self._union_runtime = {n: t.lora_name for n, t in (union_runtime or {}).items()}

    def set_runtime(self, experts: dict[str, RuntimeTarget], root: Path) -> None:
        """Serve these runtime experts (and no other): each from its folder under `root` (the state folder's
        experts/), under its own LoRA name. Leases in flight keep what they hold."""
        for name in set(self.runtime) - set(experts):
            del self.experts[name]
        clash = sorted(set(experts) & self._bundle_experts)
        if clash:  # the runtime endpoints refuse such names; a state edited by hand must not take bundle experts
            logger.error("runtime experts %s have the names of bundle experts: not served", clash)
        self.runtime = {name: target for name, target in experts.items() if name not in self._bundle_experts}
        for name, target in self.runtime.items():
            self.experts[name] = Path(target.path)
        root = Path(root).resolve()
        if self.roots is not None and root not in self.roots:
            self.roots.append(root)

    def resolve(self, spec: AdapterSpec) -> Resolved:
        """What serves `spec`; InvalidMixture for one expert that is not in the bundle, or a linear spec that
        weighs the shared adapter."""
        spec = self.served_spec(spec)
        expert = spec.single_expert()
        if expert is not None:
            if expert not in self.experts:
                raise InvalidMixture(f"unknown expert {expert!r}", param="mixture")
            member = self.union.member(expert) if self._in_union(spec) else None
            return Resolved("expert", member or self.target(self._lora_name(expert), self.experts[expert]), spec=spec)
        mixture = self.union.target(spec) if self._in_union(spec) else None
        if mixture is not None:
            return Resolved("union", mixture, spec=spec)
        return Resolved("composite", key=self.composite_key(spec), spec=spec)

    def _lora_name(self, expert: str) -> str:
        runtime = self.runtime.get(expert)
        return runtime.lora_name if runtime is not None else expert_adapter(expert)

    def _in_union(self, spec: AdapterSpec) -> bool:
        """Whether the union may serve `spec`: it has one, and every runtime expert of `spec` is the one the union
        pinned at start (an expert unloaded and loaded again since has other weights: own folder or composite)."""
        if self.union is None:
            return False
        return all(self._union_runtime.get(e) == self.runtime[e].lora_name
                   for e in spec.mixture.experts if e in self.runtime)

    def served_spec(self, spec: AdapterSpec) -> AdapterSpec:
        """`spec` as served: an exact one on top of the shared adapter where the bundle has one (a linear one is
        built on top of it by the adapter cache)."""
        if self.shared is None:
            return spec
        if spec.mode != "exact":
            why = shared_in_linear(spec.mode, spec.mixture.as_dict(), self.shared)
            if why:
                raise InvalidMixture(why, param="mixture")
            return spec
        return AdapterSpec(with_shared(spec.mixture, self.shared), "exact")

    def pinned(self) -> list[LoraTarget]:
        """Adapters the engine must load and pin before serving: the union's members (if any)."""
        return list(self.union.members) if self.union is not None else []

    # ------------------------------------------------------------------------ names and ids

    def composite_key(self, spec: AdapterSpec) -> str:
        """The composite's folder name (and cache key): mode, mixture digest, the engine's max LoRA rank, and
        for a mixture with runtime experts a digest of their LoRA names (new weights, new composite)."""
        runtime = [self.runtime[e].lora_name for e in spec.mixture.experts if e in self.runtime]
        fingerprint = hashlib.sha256("\0".join(runtime).encode()).hexdigest()[:12] if runtime else None
        return composite_folder(spec.mode, spec.mixture, self.max_lora_rank, fingerprint)

    def composite_target(self, key: str) -> LoraTarget:
        """The target of the composite in the cache folder `key`."""
        return self.target(composite_adapter(key), self.cache_dir / key)

    def target(self, name: str, path: Path) -> LoraTarget:
        """A LoRA target with a stable id; InternalError for a path outside the bundle and cache or an id
        collision."""
        allowed = [self.cache_dir.resolve(), *(self.roots if self.roots is not None else [Path(path).resolve()])]
        if not _inside(path, allowed):
            raise InternalError(f"adapter {name!r}: {path} is outside the bundle and cache folders")
        lora_id = stable_lora_id(name)
        known = self._ids.setdefault(lora_id, name)
        if known != name:
            raise InternalError(f"LoRA id collision between {known!r} and {name!r}")
        return LoraTarget(name=name, lora_id=lora_id, path=str(path))


def _inside(path: Path, roots: list[Path]) -> bool:
    """True when `path`, symlinks resolved, is one of `roots` or below one."""
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(root) for root in roots)
