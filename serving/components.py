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

from mode_cotd.bundle import Bundle, load_bundle
from mode_cotd.errors import BundleError, ConfigError
from mode_cotd.mixture import grid_units
from mode_cotd.student import resolve_student, student_identity
from serving.adapter_cache import AdapterCache
from serving.bundle_source import is_uri, local_bundle
from serving.engine import VllmEngine, cpu_threads_bind, vllm_lora_rank
from serving.fast_lora.plugin import applies_here as fast_lora_applies
from serving.mixture_union import MixtureUnion
from serving.prompts import PromptRenderer
from serving.protocol import StudentEngine
from serving.router import GateRouter
from serving.routes import RouteTable
from serving.settings import ServeSettings
from serving.student_service import StudentService, composite_dir

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


def prompt_renderer(settings: ServeSettings) -> PromptRenderer:
    return PromptRenderer.from_student(settings.student, settings.engine.max_model_len)


def gate_router(settings: ServeSettings, bundle: Bundle) -> GateRouter | None:
    return None if bundle.gate is None else GateRouter.for_student(bundle.gate, settings.student)


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
    union = None
    if settings.engine.mixture_union and settings.engine.fast_lora and fast_lora_applies():
        grid = route_table(settings, bundle).grid
        union = MixtureUnion.for_experts(experts, cache_dir, grid_units(grid), rank, bundle.shared)
    cache = AdapterCache(
        experts=experts,
        cache_dir=cache_dir,
        max_lora_rank=rank,
        max_entries=settings.cache.max_entries,
        slots=engine,
        roots=[bundle.root],
        union=union,
        shared=bundle.shared,
    )
    queued = settings.engine.max_queued_requests
    max_open = None if queued is None else settings.engine.max_num_seqs + queued
    return StudentService(engine, cache, replica, max_open=max_open)
