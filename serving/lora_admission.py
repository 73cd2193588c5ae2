"""At most N distinct LoRA adapters among the requests in vLLM, pinned adapters aside.

vLLM's scheduler lets at most `max_loras` distinct adapters into one step, and every one needs
a slot. Adapters pinned in slots (the mixture union's experts) hold slots the scheduler does not
know are taken: with `max_loras` = P pinned + N, a step could still bring N + P unpinned
adapters, one slot too many each, and vLLM would evict an adapter the step is using. So the
engine lets a request into vLLM only while its adapter is pinned, already in flight, or one of
fewer than N distinct unpinned adapters in flight; the others wait here (in arrival order per
adapter) until a request ends. Requests without an adapter never wait.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager


class LoraAdmission:
    """Bounds the distinct unpinned LoRA ids in flight; see the module docstring."""

    def __init__(self, limit: int, pinned: Iterable[int] = ()):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.pinned = frozenset(pinned)
        self.in_flight: Counter[int] = Counter()
        """Unpinned LoRA id -> requests holding it."""
        self._changed = asyncio.Condition()

    def _admits(self, lora_id: int) -> bool:
        return lora_id in self.in_flight or len(self.in_flight) < self.limit

    @asynccontextmanager
    async def hold(self, lora_id: int | None) -> AsyncIterator[None]:
        """Wait until the request may enter vLLM; hold its adapter's place until the block ends."""
        if lora_id is None or lora_id in self.pinned:
            yield
            return
        async with self._changed:
            await self._changed.wait_for(lambda: self._admits(lora_id))
            self.in_flight[lora_id] += 1
        try:
            yield
        finally:
            self.in_flight[lora_id] -= 1
            if self.in_flight[lora_id] <= 0:
                del self.in_flight[lora_id]
                async with self._changed:
                    self._changed.notify_all()
