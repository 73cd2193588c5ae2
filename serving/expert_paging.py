"""The union's experts paged in and out of vLLM's LoRA slots: at most K resident, pinned while requests use them.

By default every expert of the mixture union (serving/mixture_union.py) is loaded and pinned when the engine
starts: E slots, and vLLM's host copy of each. A union of a thousand experts then needs a thousand slots
(serving/slot_memory.py) and minutes to start. With `engine.resident_experts` = K < E the engine has K slots
for the union, and this pager fills them on demand:

- a request names one LoRA id; its **experts** are the union members it reads: a member id itself, the
  experts with a non-zero weight of a mixture id (plus the shared one), none for any other id;
- before the request enters vLLM its experts are made resident (vLLM's `add_lora` + `pin_lora`), and each
  counts the requests holding it; a held expert is never evicted;
- when a missing expert needs a slot and all K are taken, the least recently used expert that no request
  holds is unloaded (`remove_lora`, which also unpins it: vLLM has no unpin); while every resident expert
  is held, the request waits here until one is released;
- loads and unloads run one at a time, in their own task (a client that goes away mid-load cancels only
  its wait), unloads before loads, so the union never holds more than K slots.

K must cover the experts of one request: 2 (the sparse ids' top-2) or every routed expert (dense ids),
plus the shared one (`min_resident`); the engine refuses a smaller K at start. An expert whose folder
cannot be loaded fails the requests that need it (`PagingError`) and stays out of the slots.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager

from serving.fast_lora import mixture_ids
from serving.fast_lora.mixture_ids import MemberCode, MixtureCode, UnionLayout
from serving.protocol import LoraTarget

logger = logging.getLogger(__name__)

Load = Callable[[LoraTarget], Awaitable[None]]
"""Loads and pins one expert in a slot; raises when it cannot."""
Unload = Callable[[LoraTarget], Awaitable[None]]
"""Removes one expert from its slot (and vLLM's host cache); raises when it cannot."""


class PagingError(RuntimeError):
    """An expert of the union could not be loaded into (or unloaded from) a LoRA slot."""


def min_resident(layout: UnionLayout) -> int:
    """The fewest resident experts that serve any one request of the union: the experts a mixture id can weigh
    (2 in sparse form, every routed expert in dense form) plus the shared one."""
    routed = min(mixture_ids.MAX_SPARSE_WEIGHTS, layout.routed) if layout.sparse else layout.routed
    return routed + int(layout.shared)


class ExpertPager:
    """At most `limit` of the union's `members` in slots; see the module docstring."""

    def __init__(self, members: Sequence[LoraTarget], limit: int, load: Load, unload: Unload,
                 resident: Iterable[int] = ()):
        if not members:
            raise ValueError("an expert pager needs the union's members")
        self.members = {t.lora_id: t for t in members}
        """Member id -> its target."""
        self.layout = self.layout_of(members[0].lora_id)
        """The union the members form."""
        if limit < min_resident(self.layout):
            raise ValueError(f"limit {limit} is under the {min_resident(self.layout)} experts one request may need")
        self.limit = limit
        self._load, self._unload = load, unload
        self.resident: OrderedDict[int, None] = OrderedDict((i, None) for i in resident)
        """Member ids in slots (or being loaded into one), least recently used first."""
        unknown = [i for i in self.resident if i not in self.members]
        if unknown or len(self.resident) > limit:
            raise ValueError(f"resident experts {list(self.resident)}: unknown ids {unknown} or over the limit {limit}")
        self.users: Counter[int] = Counter()
        """Member id -> requests holding it (resident ones only)."""
        self.page_ins = 0
        """Experts loaded on demand since start."""
        self.page_outs = 0
        """Experts unloaded to make room since start."""
        self._ready: dict[int, asyncio.Future[None]] = {}
        """Member id -> its load in progress (absent: loaded)."""
        self._changed = asyncio.Condition()
        self._io = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        """Paging tasks in progress (held here: the loop keeps only weak references)."""

    @staticmethod
    def layout_of(member: int) -> UnionLayout:
        """The union of a member id; ValueError for any other id."""
        code = mixture_ids.decode(member)
        if not isinstance(code, MemberCode):
            raise ValueError(f"LoRA id {member} is not a union member id")  # noqa: TRY004 - a bad value, not type
        return code.layout

    def experts_of(self, lora_id: int | None) -> tuple[int, ...]:
        """The member ids a request on `lora_id` reads (none for ids outside the union)."""
        code = None if lora_id is None else mixture_ids.decode(lora_id)
        if isinstance(code, MemberCode):
            needed: tuple[int, ...] = (lora_id,)
        elif isinstance(code, MixtureCode):
            needed = tuple(mixture_ids.member_id(code.layout, block) for block, _ in code.blocks)
        else:
            return ()
        return needed if all(i in self.members for i in needed) else ()

    @asynccontextmanager
    async def hold(self, lora_id: int | None) -> AsyncIterator[None]:
        """Wait until the experts of `lora_id` are in slots, and keep them there until the block ends."""
        needed = self.experts_of(lora_id)
        if not needed:
            yield
            return
        async with self._changed:
            await self._changed.wait_for(lambda: self._fits(needed))
            victims, missing = self._reserve(needed)
            loads = [self._ready[i] for i in needed if i in self._ready]  # taken now: a failed load leaves _ready
        try:
            if missing:  # its own task: a cancelled request must not stop a load half-way
                task = asyncio.get_running_loop().create_task(self._page(victims, missing))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            for loading in loads:
                await asyncio.shield(loading)
            yield
        finally:
            async with self._changed:
                for expert in needed:
                    self.users[expert] -= 1
                    if self.users[expert] <= 0:
                        del self.users[expert]
                self._changed.notify_all()

    def _fits(self, needed: tuple[int, ...]) -> bool:
        """Whether the missing experts of `needed` fit in the free slots and those of idle experts."""
        missing = sum(1 for i in needed if i not in self.resident)
        idle = sum(1 for i in self.resident if self._evictable(i, needed))
        return missing <= self.limit - len(self.resident) + idle

    def _evictable(self, expert: int, needed: tuple[int, ...]) -> bool:
        """Resident, held by no request, not being loaded (its load still runs, even when the request that asked
        for it is gone), and not needed by the request being placed."""
        return not self.users[expert] and expert not in self._ready and expert not in needed

    def _reserve(self, needed: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """Hold `needed` and mark the missing ones resident (loading); returns the idle experts to unload for them
        (least recently used first) and the experts to load. Call under the condition, after `_fits`."""
        missing = [i for i in needed if i not in self.resident]
        over = len(self.resident) + len(missing) - self.limit
        victims = [i for i in self.resident if self._evictable(i, needed)][:max(over, 0)]
        loop = asyncio.get_running_loop()
        for expert in victims:
            del self.resident[expert]
        for expert in missing:
            self.resident[expert] = None
            self._ready[expert] = loop.create_future()
        for expert in needed:
            self.users[expert] += 1
            self.resident.move_to_end(expert)
        return victims, missing

    async def _page(self, victims: list[int], missing: list[int]) -> None:
        """Unload `victims`, then load `missing`, resolving their futures; a failure fails the missing experts."""
        async with self._io:
            try:
                for expert in victims:
                    await self._unload(self.members[expert])
                    self.page_outs += 1
                    logger.debug("expert %s paged out", self.members[expert].name)
            except Exception as e:  # noqa: BLE001 - its slot may still be taken: load nothing more into the union
                self._fail(missing, PagingError(f"could not unload expert {self.members[expert].name}: {e}"))
                missing = []
            for expert in missing:
                target = self.members[expert]
                try:
                    await self._load(target)
                except Exception as e:  # noqa: BLE001 - the requests that need it get the error
                    self._fail([expert], PagingError(f"could not load expert {target.name} ({target.path}): {e}"))
                    continue
                self.page_ins += 1
                logger.debug("expert %s paged in", target.name)
                self._ready.pop(expert).set_result(None)
        async with self._changed:  # the experts loaded (or failed) can now be evicted: waiting requests may fit
            self._changed.notify_all()

    def _fail(self, experts: list[int], error: PagingError) -> None:
        logger.error("%s", error)
        for expert in experts:
            self.resident.pop(expert, None)
            future = self._ready.pop(expert)
            future.set_exception(error)
            future.exception()  # retrieved here: a load nobody waits for any more must not log "never retrieved"
