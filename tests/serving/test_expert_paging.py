"""ExpertPager: at most K union experts in slots, held ones never unloaded, the least recently used idle one evicted,
waits while all are held, load failures reported to the requests that need the expert."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from contextlib import asynccontextmanager

import pytest

from serving.expert_paging import ExpertPager, PagingError, min_resident
from serving.fast_lora import mixture_ids
from serving.fast_lora.mixture_ids import UnionLayout
from serving.protocol import LoraTarget

SPARSE = UnionLayout(family=3, experts=40, block_rank=8, sparse=True)
SHARED = UnionLayout(family=4, experts=6, block_rank=8, shared=True)


def members(layout: UnionLayout) -> list[LoraTarget]:
    return [LoraTarget(f"expert-{i}", mixture_ids.member_id(layout, i), f"/experts/{i}") for i in range(layout.experts)]


def pair(layout: UnionLayout, i: int, j: int, n: int = 20, u: int = 10) -> int:
    """The mixture id of u/n on routed expert i and (n-u)/n on j."""
    units = [0] * layout.routed
    units[i] += u
    units[j] += n - u
    lora_id = mixture_ids.encode(layout, units, n)
    assert lora_id is not None
    return lora_id


class Slots:
    """A fake engine's slots: checks the pager's invariants at every load and unload."""

    def __init__(self, limit: int, delay: float = 0.0, broken: frozenset[str] = frozenset()):
        self.limit, self.delay, self.broken = limit, delay, broken
        self.loaded: set[int] = set()
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.running: Counter[int] = Counter()
        """Expert -> requests inside their hold block (running in the engine)."""

    async def load(self, target: LoraTarget) -> None:
        await asyncio.sleep(self.delay)
        if target.name in self.broken:
            raise OSError(f"no adapter at {target.path}")
        assert target.lora_id not in self.loaded
        assert len(self.loaded) < self.limit, "a load past the limit"
        self.loaded.add(target.lora_id)
        self.loads.append(target.name)

    async def unload(self, target: LoraTarget) -> None:
        await asyncio.sleep(self.delay)
        assert not self.running[target.lora_id], "unloaded an expert a running request reads"
        self.loaded.remove(target.lora_id)
        self.unloads.append(target.name)


def make_pager(layout: UnionLayout, limit: int, **kwargs) -> tuple[ExpertPager, Slots, list[LoraTarget]]:
    slots = Slots(limit, **kwargs)
    targets = members(layout)
    return ExpertPager(targets, limit, slots.load, slots.unload), slots, targets


@asynccontextmanager
async def running(pager: ExpertPager, slots: Slots, lora_id: int):
    """A request in the engine: its experts must be in slots from start to end."""
    async with pager.hold(lora_id):
        experts = pager.experts_of(lora_id)
        assert set(experts) <= slots.loaded, "a request ran without its experts in slots"
        slots.running.update(experts)
        try:
            yield
            assert set(experts) <= slots.loaded, "an expert left its slot while a request read it"
        finally:
            slots.running.subtract(experts)


async def use(pager: ExpertPager, slots: Slots, lora_id: int, release: asyncio.Event | None = None) -> None:
    async with running(pager, slots, lora_id):
        if release is not None:
            await release.wait()


def test_experts_of_members_mixtures_and_other_ids():
    pager, _, targets = make_pager(SPARSE, 4)
    assert pager.experts_of(targets[7].lora_id) == (targets[7].lora_id,)
    assert pager.experts_of(pair(SPARSE, 2, 9)) == (targets[2].lora_id, targets[9].lora_id)
    assert pager.experts_of(None) == () and pager.experts_of(12345) == ()
    other = UnionLayout(family=5, experts=40, block_rank=8, sparse=True)
    assert pager.experts_of(mixture_ids.member_id(other, 1)) == ()  # another union's ids are not paged here
    shared_pager, _, shared = make_pager(SHARED, 6)
    units = [0] * SHARED.routed
    units[1] = 20
    assert shared_pager.experts_of(mixture_ids.encode(SHARED, units, 20)) == (shared[1].lora_id, shared[5].lora_id)


def test_limit_must_cover_one_request():
    assert min_resident(SPARSE) == 2 and min_resident(SHARED) == 6  # dense: every routed expert, plus the shared one
    with pytest.raises(ValueError, match="under the 2 experts"):
        make_pager(SPARSE, 1)
    with pytest.raises(ValueError, match="not a union member id"):
        ExpertPager([LoraTarget("x", 7, "/x")], 4, Slots(4).load, Slots(4).unload)


def test_pages_in_on_demand_and_evicts_the_least_recently_used_idle_expert():
    async def scenario():
        pager, slots, t = make_pager(SPARSE, 3)
        for i in (0, 1, 2):
            await use(pager, slots, t[i].lora_id)
        assert slots.loads == ["expert-0", "expert-1", "expert-2"] and not slots.unloads
        await use(pager, slots, t[0].lora_id)  # a hit: 0 becomes the most recently used
        await use(pager, slots, t[3].lora_id)  # evicts 1, the least recently used
        assert slots.unloads == ["expert-1"] and slots.loaded == {t[i].lora_id for i in (0, 2, 3)}
        await use(pager, slots, pair(SPARSE, 4, 5))  # two at once: 2 and 0 go
        assert slots.unloads == ["expert-1", "expert-2", "expert-0"]
        assert (pager.page_ins, pager.page_outs) == (6, 3)

    asyncio.run(scenario())


def test_held_experts_stay_and_a_request_waits_until_one_is_released():
    async def scenario():
        pager, slots, t = make_pager(SPARSE, 2)
        release = asyncio.Event()
        holder = asyncio.create_task(use(pager, slots, pair(SPARSE, 0, 1), release))
        await asyncio.sleep(0.01)
        waiting = asyncio.create_task(use(pager, slots, t[2].lora_id))
        same = asyncio.create_task(use(pager, slots, t[1].lora_id))  # already resident: no wait
        await asyncio.sleep(0.01)
        assert same.done() and not waiting.done() and slots.loaded == {t[0].lora_id, t[1].lora_id}
        release.set()
        await asyncio.wait_for(asyncio.gather(holder, waiting), 1)
        assert t[2].lora_id in slots.loaded and len(slots.loaded) == 2

    asyncio.run(scenario())


def test_a_load_failure_fails_its_requests_and_a_later_request_tries_again():
    async def scenario():
        pager, slots, t = make_pager(SPARSE, 2, delay=0.01, broken=frozenset({"expert-3"}))
        results = await asyncio.gather(use(pager, slots, t[3].lora_id), use(pager, slots, pair(SPARSE, 0, 3)),
                                       return_exceptions=True)
        assert all(isinstance(r, PagingError) and "expert-3" in str(r) and "/experts/3" in str(r) for r in results)
        assert t[3].lora_id not in pager.resident and not pager.users[t[3].lora_id]
        slots.broken = frozenset()
        await use(pager, slots, t[3].lora_id)
        assert t[3].lora_id in slots.loaded

    asyncio.run(scenario())


def test_a_request_cancelled_mid_load_leaves_the_load_to_finish():
    async def scenario():
        pager, slots, t = make_pager(SPARSE, 2, delay=0.05)

        async def read_for(seconds: float, expert: LoraTarget) -> None:
            async with running(pager, slots, expert.lora_id):
                await asyncio.sleep(seconds)

        gone = [asyncio.create_task(use(pager, slots, t[i].lora_id)) for i in (0, 1)]
        await asyncio.sleep(0.01)
        for task in gone:
            task.cancel()  # both clients went away while their experts load
        # the loads still run, so neither expert may be evicted yet: 2 waits, 0 is served by its first load;
        # 2 then takes 1's slot once 1's load is done (0 is still read)
        later = [asyncio.create_task(use(pager, slots, t[2].lora_id)), asyncio.create_task(read_for(0.1, t[0]))]
        await asyncio.wait_for(asyncio.gather(*later), 2)
        await asyncio.sleep(0.2)  # any paging still queued
        assert slots.loads == ["expert-0", "expert-1", "expert-2"] and slots.unloads == ["expert-1"]
        assert len(slots.loaded) == 2 and not pager.users

    asyncio.run(scenario())


def test_many_requests_over_random_mixtures_keep_every_invariant():
    async def scenario():
        pager, slots, t = make_pager(SPARSE, 5, delay=0.001)
        rng = random.Random(0)

        async def request() -> None:
            i, j = sorted(rng.sample(range(12), 2))
            lora_id = rng.choice([t[i].lora_id, pair(SPARSE, i, j)])
            async with running(pager, slots, lora_id):
                await asyncio.sleep(rng.random() * 0.005)

        tasks = [asyncio.create_task(request()) for _ in range(300)]
        for task in rng.sample(tasks, 20):  # some clients go away
            task.cancel()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)
        assert len(slots.loaded) <= 5 and not pager.users and pager.page_ins > 5

    asyncio.run(scenario())


def test_the_engine_refuses_too_few_resident_experts_and_pins_all_by_default(tmp_path):
    pytest.importorskip("vllm")
    from mode_cotd.errors import ConfigError
    from serving.engine import VllmEngine
    from serving.settings import EngineSettings

    def limit(resident: int | None, layout: UnionLayout = SPARSE) -> int:
        engine = VllmEngine(tmp_path, EngineSettings(resident_experts=resident), max_lora_rank=8, max_model_len=64)
        return engine._resident_limit(members(layout))

    assert limit(None) == 40 and limit(64) == 40 and limit(5) == 5 and limit(2) == 2
    with pytest.raises(ConfigError, match="engine.resident_experts = 1: .* at least 2"):
        limit(1)
    with pytest.raises(ConfigError, match="at least 6"):  # a dense union's mixture ids may weigh every expert
        limit(5, SHARED)
    assert VllmEngine(tmp_path, EngineSettings(resident_experts=1), 8, 64)._resident_limit([]) == 0
