"""Settings -> the plain pieces of the server (no Ray here; the deployments call these).

    resolve_settings   absolute bundle path, resolved student folder, context length;
                       fails early with a clear message when the bundle does not fit
    route_table        the ingress's routes            prompt_renderer   its tokenizer
    gate_router        the router's gate + featuriser  student_service   adapter cache + engine

The engine's max LoRA rank is sized for k·r (k = the gate's top-k, r = the largest
expert rank), rounded up to a rank vLLM accepts; larger composites are SVD-compressed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from mode_cotd import paths
from mode_cotd.bundle import Bundle, load_bundle
from mode_cotd.errors import BundleError, ConfigError
from mode_cotd.mixture import grid_units
from mode_cotd.runtime_state import RuntimeState
from mode_cotd.student import resolve_student, student_identity
from serving.adapter_cache import AdapterCache
from serving.adapter_resolver import RuntimeTarget
from serving.bundle_source import is_uri, local_bundle
from serving.composition_jobs import CompositionJobs
from serving.engine import VllmEngine, cpu_threads_bind, vllm_lora_rank
from serving.fast_lora.plugin import applies_here as fast_lora_applies
from serving.mixture_union import ExpertFacts, MixtureUnion
from serving.prompts import PromptRenderer
from serving.protocol import Backend, StudentEngine
from serving.router import GateRouter
from serving.routes import RouteTable
from serving.runtime_adapters import StudentFit
from serving.runtime_routes import RuntimeRoutes
from serving.settings import ServeSettings
from serving.student_service import StudentService, bundle_fingerprint, composite_dir

DEFAULT_TOP_K = 2
"""k for sizing the engine's LoRA rank when the bundle has no gate."""


def resolve_settings(settings: ServeSettings) -> ServeSettings:
    """A copy with absolute paths (a bundle URI stays a URI) and the context length capped; checks the bundle fits."""
    bundle = local_bundle(settings.bundle)  # a URI is fetched here, and again (from the cache) by each replica
    if not (bundle / "manifest.json").is_file():
        raise BundleError(
            f"no bundle at {bundle} (manifest.json missing). Build one with the training commands "
            "(`mode-cotd pipeline --help`), or pass --bundle PATH to a bundle folder."
        )
    cpu_threads_bind(settings.engine.cpu_threads_bind, 0, [0])  # a bad value fails here, not in each replica
    settings.front()  # so does an unknown layout
    if settings.engine.stream_interval < 1:
        raise ConfigError(f"engine.stream_interval: tokens per streamed chunk must be >= 1, got "
                          f"{settings.engine.stream_interval}")
    student = resolve_student(settings.student)
    config = json.loads((student / "config.json").read_text(encoding="utf-8"))
    limit = config.get("max_position_embeddings") or settings.engine.max_model_len
    engine = dataclasses.replace(settings.engine, max_model_len=min(settings.engine.max_model_len, int(limit)))
    source = settings.bundle if is_uri(settings.bundle) else str(bundle)
    resolved = dataclasses.replace(settings, bundle=source, student=str(student), engine=engine)
    load_serving_bundle(resolved)
    return resolved


def load_serving_bundle(settings: ServeSettings) -> Bundle:
    """The bundle, validated against the student (strict: any fault is a BundleError naming the file)."""
    return load_bundle(local_bundle(settings.bundle), student=settings.student, strict=True)


def student_name(settings: ServeSettings) -> str:
    """The bare student's route name: the default student's name, or its folder's name."""
    return student_identity(Path(settings.student))["name"]


def route_table(settings: ServeSettings, bundle: Bundle) -> RouteTable:
    return RouteTable.from_bundle(bundle, student_name(settings), settings.api.served_model_name,
                                  settings.cache.mixture_grid)


def engine_lora_rank(settings: ServeSettings, bundle: Bundle) -> int:
    """The engine's max LoRA rank: engine.max_lora_rank, else k·r, rounded up to a rank vLLM accepts."""
    return vllm_lora_rank(settings.engine.max_lora_rank or needed_lora_rank(bundle))


def ingress_routes(settings: ServeSettings, bundle: Bundle) -> RouteTable | RuntimeRoutes:
    """The ingress's routes: the bundle's table, or with runtime routes on, that table kept current with the
    state folder (serving/runtime_routes.py)."""
    table = route_table(settings, bundle)
    state = runtime_state(settings, bundle)
    if state is None:
        return table
    fit = StudentFit.of(Path(settings.student), table.student_name, engine_lora_rank(settings, bundle))
    return RuntimeRoutes(table, state, settings.runtime, fit)


def composition_jobs(settings: ServeSettings, bundle: Bundle, routes: RouteTable | RuntimeRoutes,
                     backend: Backend, prompts: PromptRenderer) -> CompositionJobs | None:
    """The runtime composition jobs of an ingress (None: runtime routes off)."""
    if not isinstance(routes, RuntimeRoutes):
        return None
    experts = [name for name in bundle.experts if name != bundle.shared]
    return CompositionJobs(routes, backend, prompts.tokenizer, settings.runtime, settings.engine.max_model_len,
                           experts)


def prompt_renderer(settings: ServeSettings) -> PromptRenderer:
    return PromptRenderer.from_student(settings.student, settings.engine.max_model_len)


def gate_router(settings: ServeSettings, bundle: Bundle) -> GateRouter | None:
    return None if bundle.gate is None else GateRouter.for_student(bundle.gate, settings.student)


def runtime_state(settings: ServeSettings, bundle: Bundle) -> RuntimeState | None:
    """The runtime routes' state folder (None: runtime routes off): runtime.state_dir, else `<bundle>.runtime`
    beside a local bundle, or <mode-cotd cache>/runtime/<bundle fingerprint> for a bundle URI."""
    if not settings.runtime.enabled:
        return None
    if settings.runtime.state_dir:
        folder = Path(settings.runtime.state_dir).expanduser().resolve()
    elif is_uri(settings.bundle):
        folder = paths.cache_dir() / "runtime" / bundle_fingerprint(bundle)
    else:
        folder = bundle.root.with_name(bundle.root.name + ".runtime")
    return RuntimeState(folder, bundle.root)


def union_experts(bundle: Bundle, state: RuntimeState | None) -> tuple[dict[str, Path], dict[str, RuntimeTarget]]:
    """The experts pinned as the union at start: the bundle's, and the runtime experts in the state now whose rank
    is at most the bundle's largest (the union's block rank stays); the latter also as runtime targets."""
    experts = {name: entry.path for name, entry in bundle.experts.items()}
    if state is None:
        return experts, {}
    largest = max(entry.record.r for entry in bundle.experts.values())
    joined = {name: e for name, e in state.snapshot().experts.items() if e.r <= largest and name not in experts}
    return ({**experts, **{name: e.path for name, e in joined.items()}},
            {name: RuntimeTarget(e.lora_name, str(e.path)) for name, e in joined.items()})


def needed_lora_rank(bundle: Bundle) -> int:
    """k·r: the gate's top-k (DEFAULT_TOP_K without a gate) times the largest expert rank."""
    if not bundle.experts:
        raise BundleError(f"{bundle.root}: the bundle has no experts")
    top_k = bundle.gate.config.top_k if bundle.gate is not None else DEFAULT_TOP_K
    return top_k * max(entry.record.r for entry in bundle.experts.values())


def student_service(
    settings: ServeSettings,
    bundle: Bundle,
    engine_factory: Callable[[int], StudentEngine] | None = None,
    round_rank: Callable[[int], int] | None = None,
    replica: str = "0",
    local_rank: int = 0,
) -> StudentService:
    """Adapter cache + engine. Default: vLLM, with its rank rounding; tests pass a fake engine factory."""
    if round_rank is None or engine_factory is None:
        round_rank = round_rank or vllm_lora_rank
        engine_factory = engine_factory or (lambda rank: VllmEngine(
            Path(settings.student), settings.engine, rank, settings.engine.max_model_len, local_rank))
    rank = round_rank(settings.engine.max_lora_rank or needed_lora_rank(bundle))
    too_big = {name: e.record.r for name, e in bundle.experts.items() if e.record.r > rank}
    if too_big:
        raise ConfigError(f"experts {too_big} exceed the engine's max LoRA rank {rank}; raise engine.max_lora_rank")
    engine = engine_factory(rank)
    experts = {name: entry.path for name, entry in bundle.experts.items()}
    cache_dir = composite_dir(bundle, settings.cache.dir)
    state = runtime_state(settings, bundle)
    if state is not None:
        state.collect_garbage()
    union, joined = None, {}
    if settings.engine.mixture_union and settings.engine.fast_lora and fast_lora_applies():
        grid = route_table(settings, bundle).grid
        pinned, joined = union_experts(bundle, state)
        verified = {name: ExpertFacts(e.record.r, tuple(e.record.target_modules), dict(e.record.files))
                    for name, e in bundle.experts.items()}  # load_bundle read and checked them
        union = MixtureUnion.for_experts(pinned, cache_dir, grid_units(grid), rank, bundle.shared, known=verified)
    cache = AdapterCache(
        experts=experts,
        cache_dir=cache_dir,
        max_lora_rank=rank,
        max_entries=settings.cache.max_entries,
        slots=engine,
        roots=[bundle.root],
        union=union,
        shared=bundle.shared,
        union_runtime=joined if union is not None else None,
    )
    queued = settings.engine.max_queued_requests
    max_open = None if queued is None else settings.engine.max_num_seqs + queued
    return StudentService(engine, cache, replica, max_open=max_open, runtime=state)
