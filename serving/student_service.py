"""The student side of a request: lease the adapter, generate, release.

`StudentService` joins the adapter cache and the engine. Its stream starts with a
`GenerationStarted` (how the adapter was obtained, for the ingress's metrics) and goes
on with the engine's `GenerationDelta`s; the adapter stays leased (never evicted) until
the stream ends or is cancelled. The student deployment only wraps this class.

Admission is bounded: a replica holds at most `max_open` requests (building adapters,
waiting or running in vLLM); one more is refused with 503 before any work, so vLLM's
waiting queue never grows past `max_open - max_num_seqs`.

A background request (a runtime composition job's scoring, serving/composition_jobs.py) starts only when the
engine holds no other request, so it runs in the engine's idle time and other users' requests never wait
behind more than the one background request already running.

Runtime experts (serving/runtime_routes.py) are read from the state folder before each request whenever
its version changed, so every replica serves what any ingress added, and a replica that starts later
(or restarts) reads it at start.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from mode_cotd import paths
from mode_cotd.bundle import MANIFEST, Bundle
from mode_cotd.errors import ModeCotdError
from mode_cotd.runtime_state import RuntimeState
from serving.adapter_cache import AdapterCache, Lease
from serving.adapter_resolver import RuntimeTarget
from serving.errors import ServiceUnavailable
from serving.protocol import (
    AdapterReport,
    GenerationEvent,
    GenerationRequest,
    GenerationStarted,
    StudentEngine,
)

logger = logging.getLogger(__name__)
BACKGROUND_POLL_S = 0.01
"""How often a background request looks whether the engine is idle yet."""


def bundle_fingerprint(bundle: Bundle) -> str:
    """First 16 hex digits of sha256(manifest.json): composites of different bundles never mix."""
    return hashlib.sha256((bundle.root / MANIFEST).read_bytes()).hexdigest()[:16]


def composite_dir(bundle: Bundle, cache_dir: str | None) -> Path:
    """Where this bundle's composites live: <cache dir or <mode-cotd cache>/composites>/<fingerprint>."""
    root = Path(cache_dir).expanduser() if cache_dir else paths.cache_dir() / "composites"
    return root / bundle_fingerprint(bundle)


class StudentService:
    """Serves generation requests with the right adapter over one engine."""

    def __init__(self, engine: StudentEngine, cache: AdapterCache, replica: str = "0", max_open: int | None = None,
                 runtime: RuntimeState | None = None):
        self.engine = engine
        self.cache = cache
        self.replica = replica
        self.max_open = max_open
        self.open = 0
        self.runtime = runtime
        self.runtime_version = -1
        self.sync_runtime()

    def sync_runtime(self) -> None:
        """Serve the runtime experts of the state folder as it is now (one stat when it has not changed). A state
        file that cannot be read keeps the last good one in service (logged)."""
        if self.runtime is None:
            return
        try:
            snapshot = self.runtime.snapshot()
        except ModeCotdError as e:
            logger.error("runtime state unreadable, serving version %d: %s", self.runtime_version, e)
            return
        if snapshot.version == self.runtime_version:
            return
        experts = {n: RuntimeTarget(e.lora_name, str(e.path)) for n, e in snapshot.experts.items()}
        self.cache.resolver.set_runtime(experts, self.runtime.folder / "experts")
        self.runtime_version = snapshot.version

    @property
    def ready(self) -> bool:
        return self.engine.ready

    async def start(self) -> None:
        await self.engine.start(pinned=self.cache.pinned())

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """GenerationStarted, then the engine's deltas; raises ApiError subclasses."""
        if not self.engine.ready:
            raise ServiceUnavailable("the student is still loading; retry shortly", code="model_loading")
        if self.max_open is not None and self.open >= self.max_open:
            raise ServiceUnavailable(f"the student holds {self.open} requests (limit {self.max_open}); retry shortly")
        self.open += 1
        lease = None
        try:
            while request.background and self.engine.queue_depth() > 0:  # others first: wait for an idle engine
                await asyncio.sleep(BACKGROUND_POLL_S)
            self.sync_runtime()
            lease = None if request.adapter is None else await self.cache.acquire(request.adapter)
            target = None if lease is None else lease.target
            slots = await self.engine.lora_slots_in_use()
            yield GenerationStarted(self._report(lease, slots), self.engine.queue_depth())
            deltas = self.engine.generate(request.request_id, request.prompt_token_ids, request.sampling, target)
            async with aclosing(deltas):  # closing this stream early (client gone) aborts the engine request
                async for delta in deltas:
                    yield delta
        finally:
            self.open -= 1
            if lease is not None:
                self.cache.release(lease)

    def stats(self) -> dict:
        """Live counts for /metrics: requests held here, and unfinished in vLLM."""
        return {"replica": self.replica, "open": self.open, "engine_unfinished": self.engine.queue_depth(),
                **self.engine.paging_stats()}

    def _report(self, lease: Lease | None, slots: int) -> AdapterReport:
        if lease is None:
            return AdapterReport(lora_slots_in_use=slots, replica=self.replica)
        return AdapterReport(
            lora_name=lease.target.name,
            outcome=lease.outcome,
            build_seconds=lease.build_seconds,
            svd_error=lease.svd_error,
            evictions=lease.evictions,
            lora_slots_in_use=slots,
            replica=self.replica,
        )

    def shutdown(self) -> None:
        self.engine.shutdown()
