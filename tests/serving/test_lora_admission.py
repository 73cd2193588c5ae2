"""LoraAdmission: distinct unpinned adapters in flight stay under the limit; the rest wait their turn."""

from __future__ import annotations

import asyncio

import pytest

from serving.lora_admission import LoraAdmission


async def _enter(admission, lora_id, inside, release):
    async with admission.hold(lora_id):
        inside.append(lora_id)
        await release.wait()


def test_a_third_distinct_adapter_waits_until_one_leaves():
    async def scenario():
        admission = LoraAdmission(2, pinned=[100])
        inside, first, rest = [], asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(_enter(admission, i, inside, first if i == 1 else rest))
                 for i in (1, 2, 2, 100, None, 3)]
        await asyncio.sleep(0.05)
        assert sorted(inside, key=str) == sorted([1, 2, 2, 100, None], key=str)  # 3 waits: {1, 2} are in flight
        first.set()  # adapter 1's only request ends
        await asyncio.sleep(0.05)
        assert 3 in inside and set(admission.in_flight) == {2, 3}
        rest.set()
        await asyncio.gather(*tasks)
        assert not admission.in_flight

    asyncio.run(scenario())


def test_a_cancelled_request_gives_its_place_back():
    async def scenario():
        admission = LoraAdmission(1)
        inside, never = [], asyncio.Event()
        holder = asyncio.create_task(_enter(admission, 1, inside, never))
        waiter = asyncio.create_task(_enter(admission, 2, inside, never))
        await asyncio.sleep(0.02)
        waiter.cancel()
        holder.cancel()
        await asyncio.gather(holder, waiter, return_exceptions=True)
        assert not admission.in_flight
        later = asyncio.create_task(_enter(admission, 3, inside, asyncio.Event()))
        await asyncio.sleep(0.02)
        assert inside == [1, 3]
        later.cancel()

    asyncio.run(scenario())


def test_limit_must_be_positive():
    with pytest.raises(ValueError, match="limit"):
        LoraAdmission(0)
