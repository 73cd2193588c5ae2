"""Routes: the request's `model` (and optional `mixture`) -> what serves it.

    "mode-cotd"                      the gate decides the mixture per prompt     (kind "gate")
    "mode-cotd:<expert>"             one expert at weight 1                       (kind "expert")
    "mode-cotd:<composition>"        a named composition from the bundle         (kind "composition")
    "<student name>"                 the bare student, no adapter                 (kind "base")
    "mode-cotd" + "mixture": {...}   an explicit mixture, overriding the gate    (kind "mixture")

When an expert and a composition share a name, "mode-cotd:<name>" is the expert and
"mode-cotd:composition:<name>" the composition ("mode-cotd:expert:<name>" also works).
Explicit mixtures are exact: weights are used as given (negative allowed), rounded to the
grid (the gate's, so that equal mixtures share one composite), zero weights dropped
(mode_cotd.routes.explicit_mixture); here they are also bounded by MAX_MIXTURE_WEIGHT.
The route kinds are mode_cotd.routes.ROUTE_KINDS (all but "task", which only evaluation has).

In a bundle with a shared adapter every adapter route is served on top of it (the adapter resolver adds it:
mode_cotd.routes.with_shared); /v1/models lists each route's experts with it, and "mode-cotd:<shared>" is the
shared adapter alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mode_cotd.bundle import COMPOSITION_MODES, Bundle
from mode_cotd.errors import BundleError, ConfigError
from mode_cotd.mixture import Mixture
from mode_cotd.routes import explicit_mixture, mixture_grid, with_shared
from serving.errors import InvalidMixture, InvalidRequest, ModelNotFound
from serving.mixture_names import INFIX, named_weights
from serving.protocol import AdapterSpec

MAX_MIXTURE_WEIGHT = 16.0
"""Largest |weight| in an explicit mixture (the paper's few-shot search keeps weights in [-3, 3]); beyond it a
composite is numerically meaningless and grid rounding would overflow."""


@dataclass(frozen=True)
class Route:
    """What serves a request. `adapter` is None for "base", and for "gate" until the gate decides."""

    kind: str
    """One of mode_cotd.routes.ROUTE_KINDS."""
    model: str
    """The model name as requested (echoed in responses)."""
    name: str | None = None
    """The expert's or composition's name."""
    adapter: AdapterSpec | None = None
    """The fixed adapter of this route, if it has one before the gate runs."""


@dataclass
class ModelEntry:
    """One row of /v1/models."""

    id: str
    """The model name to request."""
    kind: str
    """One of mode_cotd.routes.ROUTE_KINDS."""
    experts: dict[str, float] | None = None
    """Fixed expert weights of the route (None for the gate, which decides per prompt)."""
    candidates: list[str] = field(default_factory=list)
    """Experts the route may use."""
    shared: str | None = None
    """The bundle's shared adapter, under this route at weight 1 (None: none, or the bare student's route)."""


@dataclass
class RouteTable:
    """All routes of one bundle; `resolve` maps a request's model and mixture to a Route."""

    served_name: str
    """Model name of the gate route, and prefix of expert/composition routes."""
    student_name: str
    """Model name of the bare student."""
    experts: list[str]
    """Expert names in the bundle."""
    compositions: dict[str, AdapterSpec]
    """Composition name -> its fixed adapter."""
    gate_experts: list[str] | None
    """Experts the gate routes to (None: the bundle has no gate, so no gate route)."""
    grid: float
    """Grid explicit mixtures are rounded to."""
    shared: str | None = None
    """The bundle's shared adapter, under every adapter route at weight 1 (None: the bundle has none)."""
    runtime_version: int = 0
    """Version of the runtime state merged in (with_runtime); 0: the bundle's routes only."""

    @classmethod
    def from_bundle(cls, bundle: Bundle, student_name: str, served_name: str, default_grid: float) -> RouteTable:
        compositions = {}
        for name, record in bundle.compositions.items():
            if record.mode not in COMPOSITION_MODES:
                raise BundleError(f"{bundle.root}: composition {name!r} has unknown mode {record.mode!r}")
            kept = {e: w for e, w in record.weights.items() if w != 0}
            if not kept:
                raise BundleError(f"{bundle.root}: composition {name!r} has only zero weights")
            compositions[name] = AdapterSpec(Mixture(tuple(kept), tuple(kept.values())), record.mode)
        gate = bundle.gate
        return cls(
            served_name=served_name,
            student_name=student_name,
            experts=sorted(bundle.experts),
            compositions=compositions,
            gate_experts=list(gate.config.experts) if gate is not None else None,
            grid=mixture_grid(bundle, default_grid),
            shared=bundle.shared,
        )

    def with_runtime(self, experts: list[str], compositions: dict[str, tuple[dict[str, float], str]],
                     version: int) -> RouteTable:
        """This table plus runtime experts and compositions (name -> (weights, mode)), at state `version`.
        A runtime route never replaces a bundle route (the runtime endpoints refuse such names)."""
        specs = {name: AdapterSpec(Mixture(tuple(w), tuple(w.values())), mode)
                 for name, (w, mode) in compositions.items() if name not in self.compositions}
        return dataclasses.replace(
            self, experts=sorted({*self.experts, *experts}), compositions={**self.compositions, **specs},
            runtime_version=version)

    def names(self) -> set[str]:
        """Every expert and composition name, and the student's: what a new runtime route may not be called."""
        return {*self.experts, *self.compositions, self.student_name}

    def __post_init__(self) -> None:
        if ":" in self.student_name or self.student_name == self.served_name:
            raise ConfigError(f"student name {self.student_name!r} clashes with the route names")

    # ------------------------------------------------------------------------ resolving

    def resolve(self, model: str, mixture: dict[str, Any] | None = None) -> Route:
        """The route for `model` (+ explicit `mixture`); ModelNotFound / InvalidMixture / InvalidRequest.

        A mixture may also be named in `model` ("<served name>:mixture:a=0.7,b=0.3", serving/mixture_names.py)."""
        named = self.served_name + INFIX
        if model.startswith(named):
            if mixture is not None:
                raise InvalidRequest(f"model {model!r} names a mixture, and the body has one too: give it once",
                                     param="mixture")
            return Route("mixture", model, adapter=AdapterSpec(self.mixture(named_weights(model, named))))
        if mixture is not None:
            if model != self.served_name:
                raise InvalidRequest(
                    f"'mixture' is only accepted with model {self.served_name!r}, not {model!r}", param="mixture"
                )
            return Route("mixture", model, adapter=AdapterSpec(self.mixture(mixture)))
        if model == self.served_name:
            if self.gate_experts is None:
                raise ModelNotFound(
                    f"model {model!r} needs a gate, and this bundle has none; use one of: {', '.join(self.model_ids())}",
                    param="model",
                )
            return Route("gate", model)
        if model == self.student_name:
            return Route("base", model)
        prefix = f"{self.served_name}:"
        if model.startswith(prefix):
            kind, _, name = model[len(prefix):].rpartition(":")
            if kind in ("", "expert") and name in self.experts:
                return Route("expert", model, name, AdapterSpec(Mixture.one(name)))
            if kind in ("", "composition") and name in self.compositions:
                return Route("composition", model, name, self.compositions[name])
        raise ModelNotFound(
            f"The model {model!r} does not exist; available: {', '.join(self.model_ids())}", param="model"
        )

    def mixture(self, mixture: Any) -> Mixture:
        """Validate an explicit {expert: weight} and round it to the grid (InvalidMixture on any fault)."""
        if isinstance(mixture, dict):
            for name, weight in mixture.items():
                if isinstance(weight, (int, float)) and not isinstance(weight, bool) and not math.isfinite(weight):
                    raise InvalidMixture(f"mixture weight for {name!r} must be finite, got {weight}", param="mixture")
                if isinstance(weight, (int, float)) and abs(weight) > MAX_MIXTURE_WEIGHT:
                    raise InvalidMixture(f"mixture weight for {name!r} must be within [-{MAX_MIXTURE_WEIGHT:g}, "
                                         f"{MAX_MIXTURE_WEIGHT:g}], got {weight}", param="mixture")
        try:
            return explicit_mixture(mixture, self.grid, self.experts)
        except ConfigError as e:
            raise InvalidMixture(str(e), param="mixture") from e

    # ------------------------------------------------------------------------ listing

    def served_experts(self, adapter: AdapterSpec | None) -> dict[str, float]:
        """Expert -> weight of what serves `adapter`: its experts on top of the shared adapter where the bundle has
        one (the student service adds it, serving.adapter_resolver); {} for the bare student."""
        return {} if adapter is None else with_shared(adapter.mixture, self.shared).as_dict()

    def models(self) -> list[ModelEntry]:
        """Every route, as /v1/models lists it."""
        entries = []
        if self.gate_experts is not None:
            gate = [*self.gate_experts, *([self.shared] if self.shared is not None else [])]
            entries.append(ModelEntry(self.served_name, "gate", None, gate, self.shared))
        clash = set(self.experts) & set(self.compositions)
        for name in self.experts:
            served = with_shared(Mixture.one(name), self.shared)
            entries.append(ModelEntry(f"{self.served_name}:{name}", "expert", served.as_dict(), list(served.experts),
                                      self.shared))
        for name, spec in self.compositions.items():
            model = f"{self.served_name}:composition:{name}" if name in clash else f"{self.served_name}:{name}"
            served = with_shared(spec.mixture, self.shared)
            entries.append(ModelEntry(model, "composition", served.as_dict(), list(served.experts), self.shared))
        entries.append(ModelEntry(self.student_name, "base", {}))
        return entries

    def model_ids(self) -> list[str]:
        return [m.id for m in self.models()]
