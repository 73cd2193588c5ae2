"""Routes: the one vocabulary of what serves a prompt, and the names of the adapters that do.

Route kinds (ROUTE_KINDS), the same for the server and for evaluation:

    base          the bare student, no adapter
    expert        one expert of the bundle, at weight 1
    composition   a named composition of the bundle (its mode: exact or linear)
    gate          the bundle's gate picks a mixture per prompt (top-k, rounded to its grid)
    mixture       one explicit mixture {expert: weight} (`explicit_mixture`)
    task          evaluation only: the bundle's own route for each prompt's task

How a route is written depends on who asks: the server reads model names ("mode-cotd",
"mode-cotd:<name>", serving/routes.py), evaluation reads "expert:<name>", "gate", ...
(training/routes.py).

Adapter names (vLLM's lora_name) and composite folders:

    expert-<expert>                                    an expert's own folder (`expert_adapter`)
    mixture-<mixture digest>                           a mixture id over the server's union (`mixture_adapter`)
    <mode>-<mixture digest>[-<experts>]-r<max rank>    a composite's folder (`composite_folder`); evaluation
                                                       adds a fingerprint of the experts' files
    composite-<folder>                                 a composite (`composite_adapter`)

A bundle with a shared adapter (`manifest.shared`, issue 27: experts trained as residuals over it) serves every
adapter route on top of it: the route's mixture plus the shared adapter at weight 1, exactly (`with_shared`).
The shared adapter alone is its own expert route; the base route stays the bare student.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mode_cotd.bundle import Bundle
from mode_cotd.mixture import Mixture

ROUTE_KINDS = ("base", "expert", "composition", "gate", "mixture", "task")
"""Every route kind; the server has all but "task"."""
DEFAULT_GRID = 0.05
"""Grid explicit mixtures are rounded to when the bundle has no gate (the gate's own grid otherwise)."""


def mixture_grid(bundle: Bundle, default: float = DEFAULT_GRID) -> float:
    """The grid of explicit mixtures for `bundle`: its gate's, else `default`."""
    return bundle.gate.config.grid if bundle.gate is not None else default


def explicit_mixture(weights: Any, grid: float, experts: Sequence[str]) -> Mixture:
    """An explicit mixture: exact, weights as given (negative allowed), each rounded to the nearest multiple of
    `grid` (the gate's, so that equal mixtures share one adapter), zero weights dropped. ConfigError names an
    expert not in `experts`, a weight that is not a finite number, or a mixture with nothing left."""
    return Mixture.from_dict(weights, grid, known_experts=experts, normalise=False)


def with_shared(mixture: Mixture, shared: str | None) -> Mixture:
    """`mixture` plus the shared adapter `shared` at weight 1: what an adapter route of a bundle with a shared
    adapter serves (student + shared + the route's experts, ΔW = ΔW_shared + Σᵢ wᵢ ΔWᵢ). Unchanged when there is
    no shared adapter or the mixture already names it (its weight is then the mixture's own)."""
    if shared is None or shared in mixture.experts:
        return mixture
    return Mixture.from_units({**dict(zip(mixture.experts, mixture.units)), shared: mixture.n}, mixture.n)


def expert_adapter(expert: str) -> str:
    """The adapter name of an expert's own folder."""
    return f"expert-{expert}"


def mixture_adapter(mixture: Mixture) -> str:
    """The adapter name of a mixture served as a mixture id over the union of the experts."""
    return f"mixture-{mixture.digest}"


def composite_folder(mode: str, mixture: Mixture, max_rank: int, fingerprint: str | None = None) -> str:
    """The folder name of the composite computing `mixture` under `mode`, at most of rank `max_rank`."""
    experts = f"-{fingerprint}" if fingerprint is not None else ""
    return f"{mode}-{mixture.digest}{experts}-r{max_rank}"


def composite_adapter(folder: str) -> str:
    """The adapter name of the composite in `folder` (a composite_folder name)."""
    return f"composite-{folder}"
