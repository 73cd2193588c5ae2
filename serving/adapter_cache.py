"""Mixture -> exact composite LoRA folder on local disk, built once, served by a stable id.

- `acquire` asks the resolver (serving.adapter_resolver) what serves the spec: one expert's
  own folder or pinned member id, or a mixture id over the union, is leased as is (no composite).
- Any other mixture becomes one composite (mode "exact": `compose_exact`, rank Σrᵢ;
  mode "linear": the paper's `merge_linear`), written atomically to
  `<cache dir>/<mode>-<mixture digest>-r<max rank>/` (mode_cotd.routes.composite_folder). A
  composite over the engine's max LoRA rank is compressed by truncated SVD to fit; the
  relative error is reported.
- Single flight: concurrent requests for a mixture that is not ready share one build
  (an asyncio task); the one that started it reports a "miss" with the build time, the
  others a "hit".
- LRU: beyond `max_entries` composites, the least recently used idle one is evicted from
  vLLM (`remove_lora`, freeing its slot) and then from disk. Composites in use (leased)
  are never evicted.
- LoRA ids are stable: derived from the adapter's name (a hash), the same across restarts
  (serving.adapter_resolver.stable_lora_id).
- Integrity: each composite folder holds `mode_cotd_checksums.json` (sha256 of its files),
  written after the folder itself. Folders left by an earlier run are reused only when
  their checksums match and `load_adapter` accepts them; a ready composite whose files
  changed on disk (size or mtime) is checked again. A bad one is dropped from vLLM and
  rebuilt, so vLLM never loads a corrupt or half-written folder. A composite that fails
  to build is reported (500, code "adapter_build_failed") and not cached: the next
  request tries again.
- Paths are confined: composites live under the cache dir, experts under `roots` (the
  bundle); anything else is refused before vLLM sees it (the resolver's targets).
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mode_cotd.adapter import LoraAdapter, load_adapter, save_adapter
from mode_cotd.errors import ModeCotdError
from mode_cotd.mixing import compress_svd, mix
from serving.adapter_resolver import AdapterResolver, RuntimeTarget
from serving.errors import ApiError, InternalError, InvalidMixture
from serving.mixture_union import MixtureUnion
from serving.protocol import AdapterSpec, LoraTarget
from serving.sealed import check_seal, seal

logger = logging.getLogger(__name__)

_FOLDER = re.compile(r"(exact|linear)-[0-9a-f]{16}(-[0-9a-f]{12})?-r\d+")
_LEFTOVER = re.compile(r"\.(exact|linear)-[0-9a-f]{16}(-[0-9a-f]{12})?-r\d+\..*")
LEFTOVER_AGE_S = 600.0
"""Temporary folders of an interrupted write older than this are removed at start (younger ones may be
another replica's write in progress)."""


class LoraSlots(Protocol):
    """The engine side of eviction: drop an adapter from vLLM's slots and host cache."""

    async def remove_lora(self, lora_id: int) -> bool: ...


@dataclass
class Lease:
    """An adapter held for one request; `release` it when the request ends."""

    target: LoraTarget
    """What vLLM loads."""
    outcome: str
    """"expert" (own folder), "union" (a mixture id over the pinned experts), "hit" (composite ready or being
    built by another request), "miss" (built it)."""
    key: str | None = None
    """Cache key of a composite (None for an expert's folder)."""
    build_seconds: float | None = None
    """Build time, for the request that built the composite."""
    svd_error: float | None = None
    """Relative error of the SVD compression, when the composite needed one (reported with the build)."""
    evictions: int = 0
    """Composites evicted to make room, reported with the build."""


@dataclass
class _Built:
    seconds: float | None
    svd_error: float | None
    evictions: int


class AdapterCache:
    """Composite adapters on disk for one bundle, keyed by mixture; see the module docstring.

    `resolver` (built from experts, cache_dir, max_lora_rank, roots and union) decides what serves a spec.
    """

    def __init__(
        self,
        experts: dict[str, Path],
        cache_dir: Path,
        max_lora_rank: int,
        max_entries: int = 64,
        slots: LoraSlots | None = None,
        roots: list[Path] | None = None,
        union: MixtureUnion | None = None,
        shared: str | None = None,
        union_runtime: dict[str, RuntimeTarget] | None = None,
    ):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.resolver = AdapterResolver(experts, cache_dir, max_lora_rank, roots, union, shared, union_runtime)
        self.experts = self.resolver.experts
        self.cache_dir = Path(cache_dir)
        self.max_lora_rank = max_lora_rank
        self.max_entries = max_entries
        self.slots = slots
        self._ready: OrderedDict[str, LoraTarget] = OrderedDict()  # LRU order: oldest first
        self._on_disk: set[str] = set()  # found from an earlier run, not validated yet
        self._pending: dict[str, asyncio.Task] = {}
        self._users: Counter[str] = Counter()
        self._expert_adapters: dict[str, LoraAdapter] = {}
        self._stamps: dict[str, tuple] = {}  # key -> size and mtime of its files when last verified
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._adopt_earlier_folders()

    # ------------------------------------------------------------------------ names

    @property
    def union(self) -> MixtureUnion | None:
        """The resolver's mixture union (None: every mixture is a composite)."""
        return self.resolver.union

    def pinned(self) -> list[LoraTarget]:
        """Adapters the engine must load and pin before serving: the union's members (if any)."""
        return self.resolver.pinned()

    def key(self, spec: AdapterSpec) -> str:
        """The cache key (folder name) of the composite of `spec` (on top of the shared adapter, if any)."""
        return self.resolver.composite_key(self.resolver.served_spec(spec))

    def _composite_target(self, key: str) -> LoraTarget:
        return self.resolver.composite_target(key)

    @property
    def entries(self) -> list[str]:
        """Cache keys of composites on disk, least recently used first."""
        return [*sorted(self._on_disk), *self._ready]

    # ------------------------------------------------------------------------ leasing

    async def acquire(self, spec: AdapterSpec) -> Lease:
        """The adapter of `spec` (what the resolver says serves it), a composite built if needed (once for
        concurrent callers); hold it until `release`."""
        resolved = self.resolver.resolve(spec)
        if resolved.target is not None:
            return Lease(resolved.target, resolved.outcome)
        key, spec = resolved.key, resolved.spec
        self._users[key] += 1
        try:
            if key in self._ready and key not in self._pending and not self._unchanged(key):
                logger.warning("composite %s changed on disk; checking it again", key)
                del self._ready[key]
                self._on_disk.add(key)  # _prepare verifies its checksums and rebuilds it if they fail
            if key in self._ready:
                self._ready.move_to_end(key)
                return Lease(self._ready[key], "hit", key)
            task = self._pending.get(key)
            owner = task is None
            if owner:
                task = asyncio.ensure_future(self._prepare(key, spec))
                self._pending[key] = task
            built: _Built = await asyncio.shield(task)
        except BaseException:
            self._release_key(key)
            raise
        self._ready.move_to_end(key)
        if owner and built.seconds is not None:
            return Lease(self._ready[key], "miss", key, built.seconds, built.svd_error, built.evictions)
        return Lease(self._ready[key], "hit", key)

    def release(self, lease: Lease) -> None:
        if lease.key is not None:
            self._release_key(lease.key)

    @asynccontextmanager
    async def lease(self, spec: AdapterSpec) -> AsyncIterator[Lease]:
        held = await self.acquire(spec)
        try:
            yield held
        finally:
            self.release(held)

    def _release_key(self, key: str) -> None:
        self._users[key] -= 1
        if self._users[key] <= 0:
            del self._users[key]

    # ------------------------------------------------------------------------ building

    async def _prepare(self, key: str, spec: AdapterSpec) -> _Built:
        try:
            folder = self.cache_dir / key
            if key in self._on_disk:
                self._on_disk.discard(key)
                if await asyncio.to_thread(self._valid, folder):
                    self._ready[key] = self._composite_target(key)
                    self._stamps[key] = _stamp(folder)
                    return _Built(None, None, 0)
                if self._users[key] <= 1:  # vLLM may hold the bad copy; never pull one that requests still use
                    await self._drop_from_engine(self._composite_target(key))
                await asyncio.to_thread(shutil.rmtree, folder, True)
            started = time.perf_counter()
            try:
                svd_error = await asyncio.to_thread(self._build, spec, folder)
            except ApiError:
                raise
            except (ModeCotdError, OSError, ValueError, RuntimeError, MemoryError) as e:
                logger.error("composite %s failed to build: %s", key, e)
                raise InternalError(f"could not build the adapter for mixture {spec.mixture}: {e}",
                                    code="adapter_build_failed") from e
            seconds = time.perf_counter() - started
            self._stamps[key] = await asyncio.to_thread(_stamp, folder)
            self._ready[key] = self._composite_target(key)
            evictions = await self._evict()
            return _Built(seconds, svd_error, evictions)
        finally:
            self._pending.pop(key, None)

    def _expert(self, name: str) -> LoraAdapter:
        if name not in self.experts:
            raise InvalidMixture(f"unknown expert {name!r}; known: {', '.join(sorted(self.experts))}", param="mixture")
        path = str(self.experts[name])  # by folder: a runtime expert loaded again has a new one
        if path not in self._expert_adapters:
            self._expert_adapters[path] = load_adapter(path)
        return self._expert_adapters[path]

    def _build(self, spec: AdapterSpec, folder: Path) -> float | None:
        """Compose (exact or linear, mode_cotd.mixing.mix), compress to the max rank if needed, write; return the
        SVD error or None."""
        adapters = [self._expert(name) for name in spec.mixture.experts]
        weights = list(spec.mixture.weights)
        if spec.mode not in ("exact", "linear"):
            raise InvalidMixture(f"unknown composition mode {spec.mode!r}")
        shared = self.resolver.shared  # exact specs carry it among their experts; a linear merge gets it on top
        over = self._expert(shared) if shared is not None and spec.mode == "linear" else None
        composite = mix(adapters, weights, spec.mode, over)
        svd_error = None
        if composite.r > self.max_lora_rank:
            composite, svd_error = compress_svd(composite, self.max_lora_rank)
        save_adapter(composite, folder)
        seal(folder)  # last: a folder without it is invalid
        return svd_error

    def _valid(self, folder: Path) -> bool:
        """Checksums recorded and matching, and an adapter vLLM can load within the max rank."""
        try:
            check_seal(folder)
            return load_adapter(folder).r <= self.max_lora_rank
        except (ModeCotdError, OSError, ValueError) as e:
            logger.warning("discarding cached composite %s: %s", folder, e)
            return False

    def _unchanged(self, key: str) -> bool:
        """True when the composite's files have the size and mtime they had when last verified."""
        try:
            return self._stamps.get(key) == _stamp(self.cache_dir / key)
        except OSError:
            return False

    async def _drop_from_engine(self, target: LoraTarget) -> None:
        if self.slots is not None:
            try:
                await self.slots.remove_lora(target.lora_id)
            except Exception:  # the engine may not hold it
                logger.warning("remove_lora(%s) failed", target.name, exc_info=True)

    # ------------------------------------------------------------------------ eviction

    async def _evict(self) -> int:
        """Evict least recently used idle composites beyond max_entries; return how many."""
        evicted = 0
        while len(self._ready) + len(self._on_disk) > self.max_entries:
            victim = next((k for k in [*sorted(self._on_disk), *self._ready]
                           if self._users[k] == 0 and k not in self._pending), None)
            if victim is None:
                break  # everything is in use: stay over the limit until requests finish
            target = self._ready.pop(victim, None)
            self._on_disk.discard(victim)
            self._stamps.pop(victim, None)
            if target is not None:
                await self._drop_from_engine(target)
            await asyncio.to_thread(shutil.rmtree, self.cache_dir / victim, True)
            evicted += 1
        return evicted

    def _adopt_earlier_folders(self) -> None:
        now = time.time()
        for leftover in self.cache_dir.iterdir():  # temporary folders of writes cut short by a crash
            if _LEFTOVER.fullmatch(leftover.name) and now - leftover.lstat().st_mtime > LEFTOVER_AGE_S:
                shutil.rmtree(leftover, ignore_errors=True)
        found = sorted((p for p in self.cache_dir.iterdir()
                        if _FOLDER.fullmatch(p.name) and p.is_dir() and not p.is_symlink()),
                       key=lambda p: p.stat().st_mtime)
        for stale in found[: max(0, len(found) - self.max_entries)]:
            shutil.rmtree(stale, ignore_errors=True)
        self._on_disk = {p.name for p in found[max(0, len(found) - self.max_entries):]}


def _stamp(folder: Path) -> tuple:
    """(name, size, mtime_ns) of every file of a composite folder: cheap evidence that nothing changed."""
    return tuple(sorted((f.name, st.st_size, st.st_mtime_ns) for f in folder.iterdir() if f.is_file()
                        for st in [f.stat()]))
