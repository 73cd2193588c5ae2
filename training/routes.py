"""Evaluation routes: which adapter serves each test prompt.

    base                    the bare student, no adapter
    expert:<name>           one expert of the bundle
    composition:<name>      a named composition of the bundle (its mode: exact or linear)
    gate                    the bundle's gate picks a mixture per prompt (top-k, grid-rounded)
    mixture:{"a": 0.5, ...} one explicit mixture for every prompt (exact; weights as given,
                            negative allowed, rounded to the gate's grid, as the server does:
                            mode_cotd.routes.explicit_mixture)
    task                    the bundle's own route for each prompt's task: the expert trained on
                            it, else the composition found for it (the paper's protocol)

The kinds are mode_cotd.routes.ROUTE_KINDS; this module holds their text syntax and the plan.
A plan maps each prompt to a `LoraChoice` (a PEFT folder) or None (no adapter). Mixtures
other than one expert at weight 1 become exact composites (mixing.compose_exact), written
once into the cache folder as ``<mode>-<mixture digest>-<experts fingerprint>-r<max rank>/``
(mode_cotd.routes.composite_folder); the fingerprint hashes the experts' file checksums, so a
retrained bundle never reuses a stale composite. Every folder handed out has been read back with adapter.load_adapter, so vLLM
never meets one it cannot load. An adapter (composite or expert) of a rank above `max_rank`
is compressed by truncated SVD (mixing.compress_svd) into a cached folder, and the relative
error is kept in `compressions`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mode_cotd.adapter import LoraAdapter, load_adapter, save_adapter
from mode_cotd.bundle import Bundle, shared_in_linear
from mode_cotd.errors import BundleError, ConfigError
from mode_cotd.featurise import make_featuriser
from mode_cotd.mixing import compress_svd, mix
from mode_cotd.mixture import Mixture
from mode_cotd.routes import (
    composite_adapter,
    composite_folder,
    expert_adapter,
    explicit_mixture,
    mixture_grid,
    with_shared,
)
from training.gate import featurise


@dataclass(frozen=True)
class RouteSpec:
    """A parsed route."""

    kind: str
    """One of mode_cotd.routes.ROUTE_KINDS."""
    name: str | None = None
    """The expert's or composition's name."""
    weights: tuple[tuple[str, float], ...] | None = None
    """An explicit mixture's (expert, weight) pairs, sorted."""

    @property
    def label(self) -> str:
        """The route as text, e.g. "expert:gsm8k" or 'mixture:{"a": 0.5, "b": 0.5}'."""
        if self.kind in ("expert", "composition"):
            return f"{self.kind}:{self.name}"
        if self.kind == "mixture":
            return "mixture:" + json.dumps(dict(self.weights or ()), sort_keys=True)
        return self.kind


def parse_route(text: str) -> RouteSpec:
    """A RouteSpec from its text form (see the module docstring); ConfigError names a bad one."""
    kind, _, rest = text.partition(":")
    if kind in ("base", "gate", "task") and not rest:
        return RouteSpec(kind)
    if kind in ("expert", "composition") and rest:
        return RouteSpec(kind, name=rest)
    if kind == "mixture" and rest:
        try:
            weights = json.loads(rest)
        except json.JSONDecodeError as e:
            raise ConfigError(f"route {text!r}: the mixture is not JSON ({e.msg})") from None
        if not isinstance(weights, dict) or not weights:
            raise ConfigError(f"route {text!r}: the mixture must be a JSON object {{expert: weight}}")
        return RouteSpec(kind, weights=tuple(sorted(weights.items())))
    raise ConfigError(f"unknown route {text!r}; routes: base, expert:<name>, composition:<name>, gate, "
                      "mixture:{json}, task")


@dataclass(frozen=True)
class LoraChoice:
    """One adapter folder that serves some prompts."""

    name: str
    """Unique adapter name (vLLM's lora_name): "expert-<name>" or "composite-<folder>" (mode_cotd.routes)."""
    path: Path
    """The PEFT folder."""
    rank: int
    """Its LoRA rank (vLLM's max_lora_rank must be >= it)."""
    experts: tuple[tuple[str, float], ...]
    """(expert, weight) pairs it computes, for reports."""


@dataclass
class RoutePlanner:
    """Turns routes into per-prompt adapter folders for one bundle and student."""

    bundle: Bundle | None
    """The loaded bundle (None: only the base route)."""
    student: Path
    """The student folder (the gate's featuriser reads it)."""
    cache_dir: Path
    """Where composite folders are written."""
    max_rank: int = 512
    """Composites above this rank are compressed by truncated SVD."""
    compressions: dict[str, float] = field(default_factory=dict)
    """Composite name -> relative error of its SVD compression."""

    def __post_init__(self) -> None:
        self._adapters: dict[str, LoraAdapter] = {}
        self._choices: dict[tuple, LoraChoice] = {}

    # ------------------------------------------------------------------------ planning

    def plan(self, route: RouteSpec, prompts: Sequence[str], tasks: Sequence[str]) -> list[LoraChoice | None]:
        """One adapter (or None) per prompt; ``tasks[i]`` is prompt i's task (used by the "task" route)."""
        if route.kind == "base":
            return [None] * len(prompts)
        self._need_bundle(route)
        if route.kind == "expert":
            return [self.expert(route.name)] * len(prompts)
        if route.kind == "composition":
            return [self.composition(route.name)] * len(prompts)
        if route.kind == "mixture":
            return [self.mixture(self.explicit_mixture(route))] * len(prompts)
        if route.kind == "gate":
            return self.gate(prompts)
        if route.kind == "task":
            return [self.for_task(task) for task in tasks]
        raise ConfigError(f"unknown route kind {route.kind!r}")  # parse_route never makes one

    def _need_bundle(self, route: RouteSpec) -> Bundle:
        if self.bundle is None:
            raise ConfigError(f"route {route.label!r} needs a bundle")
        return self.bundle

    def with_shared(self, mixture: Mixture) -> Mixture:
        """``mixture`` on top of the bundle's shared adapter (mode_cotd.routes.with_shared)."""
        return with_shared(mixture, self.bundle.shared if self.bundle is not None else None)

    def expert(self, name: str) -> LoraChoice:
        bundle = self._need_bundle(RouteSpec("expert", name))
        if name not in bundle.experts:
            raise ConfigError(f"route expert:{name}: no such expert in {bundle.root}; it has {sorted(bundle.experts)}")
        if bundle.shared is not None and name != bundle.shared:
            return self.mixture(Mixture.one(name))  # on top of the shared adapter
        key = ("expert", name)
        if key not in self._choices:
            entry = bundle.experts[name]
            if entry.record.r > self.max_rank:  # served compressed, like any adapter over the limit
                self._choices[key] = self._composite(Mixture.one(name), "exact")
            else:
                self._choices[key] = LoraChoice(expert_adapter(name), entry.path, entry.record.r, ((name, 1.0),))
        return self._choices[key]

    def composition(self, name: str) -> LoraChoice:
        bundle = self._need_bundle(RouteSpec("composition", name))
        if name not in bundle.compositions:
            raise ConfigError(f"route composition:{name}: no such composition in {bundle.root}; "
                              f"it has {sorted(bundle.compositions)}")
        record = bundle.compositions[name]
        return self.mixture(Mixture(tuple(record.weights), tuple(record.weights.values())), record.mode)

    def explicit_mixture(self, route: RouteSpec) -> Mixture:
        bundle = self._need_bundle(route)
        return explicit_mixture(dict(route.weights or ()), mixture_grid(bundle), list(bundle.experts))

    def gate(self, prompts: Sequence[str]) -> list[LoraChoice | None]:
        bundle = self._need_bundle(RouteSpec("gate"))
        if bundle.gate is None:
            raise ConfigError(f"route gate: the bundle {bundle.root} has no gate (run mode-cotd train-gate)")
        featuriser = make_featuriser(bundle.gate.config.featuriser, self.student)
        mixtures = bundle.gate.mixtures(featurise(featuriser, list(prompts)))  # [B] mixtures
        return [self.mixture(mixture) for mixture in mixtures]

    def for_task(self, task: str) -> LoraChoice:
        bundle = self._need_bundle(RouteSpec("task"))
        experts = sorted(n for n, e in bundle.experts.items() if e.record.task == task)
        if experts:
            return self.expert(task if task in experts else experts[0])
        compositions = sorted(n for n, c in bundle.compositions.items() if c.task == task)
        if compositions:
            return self.composition(task if task in compositions else compositions[0])
        raise ConfigError(f"route task: the bundle {bundle.root} has neither an expert nor a composition "
                          f"for task {task!r}")

    # ------------------------------------------------------------------------ composites

    def mixture(self, mixture: Mixture, mode: str = "exact") -> LoraChoice:
        """The folder computing ``mixture`` under ``mode``: an expert's own folder for one expert at weight 1.

        In a bundle with a shared adapter the mixture is served on top of it: an exact one as one more expert at
        weight 1 (`with_shared`), a linear one as the merge of its experts plus the shared adapter
        (mode_cotd.mixing.mix)."""
        if self.bundle is not None and self.bundle.shared is not None:
            shared = self.bundle.shared
            if mode != "exact":
                why = shared_in_linear(mode, mixture.as_dict(), shared)
                if why:
                    raise ConfigError(f"{self.bundle.root}: {why}")
                return self._cached_composite(mixture, mode)
            mixture = self.with_shared(mixture)
            if mixture.sole_expert == self.bundle.shared:
                return self.expert(mixture.sole_expert)  # the shared adapter alone: its own folder
            return self._cached_composite(mixture, mode)
        if mixture.sole_expert is not None:
            return self.expert(mixture.sole_expert)
        return self._cached_composite(mixture, mode)

    def _cached_composite(self, mixture: Mixture, mode: str) -> LoraChoice:
        cache_key = (mode, mixture)
        if cache_key not in self._choices:
            self._choices[cache_key] = self._composite(mixture, mode)
        return self._choices[cache_key]

    def _fingerprint(self, experts: Sequence[str]) -> str:
        bundle = self._need_bundle(RouteSpec("mixture"))
        files = {name: bundle.experts[name].record.files for name in experts}
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]

    def _adapter(self, name: str) -> LoraAdapter:
        bundle = self._need_bundle(RouteSpec("expert", name))
        if name not in bundle.experts:
            raise ConfigError(f"mixture names unknown expert {name!r}; the bundle has {sorted(bundle.experts)}")
        if name not in self._adapters:
            self._adapters[name] = bundle.experts[name].load()
        return self._adapters[name]

    def _composite(self, mixture: Mixture, mode: str) -> LoraChoice:
        shared = self.bundle.shared if self.bundle is not None and mode != "exact" else None  # added on top
        experts = (*mixture.experts, *([shared] if shared else []))
        folder = self.cache_dir / composite_folder(mode, mixture, self.max_rank, self._fingerprint(experts))
        adapter = None
        if folder.is_dir():
            try:
                adapter = load_adapter(folder)
            except BundleError:
                adapter = None  # rebuilt below
        if adapter is None:
            adapters = [self._adapter(name) for name in mixture.experts]
            weights = mixture.weights
            adapter = mix(adapters, weights, mode, self._adapter(shared) if shared else None)
            if adapter.r > self.max_rank:
                adapter, error = compress_svd(adapter, self.max_rank)
                self.compressions[folder.name] = error
            save_adapter(adapter, folder)
            adapter = load_adapter(folder)
        served = tuple(zip(mixture.experts, mixture.weights)) + (((shared, 1.0),) if shared else ())
        return LoraChoice(composite_adapter(folder.name), folder, adapter.r, served)
