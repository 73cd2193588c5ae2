"""Adapter cache: expert folders, exact composites, single flight, LRU over disk and vLLM slots, SVD."""

from __future__ import annotations

import asyncio

import pytest
import torch

from mode_cotd.adapter import load_adapter
from mode_cotd.mixing import compose_exact, delta_weight, merge_linear
from mode_cotd.mixture import Mixture
from serving.adapter_cache import AdapterCache
from serving.adapter_resolver import stable_lora_id
from serving.errors import InternalError, InvalidMixture
from serving.protocol import AdapterSpec


def spec(mode: str = "exact", **weights: float) -> AdapterSpec:
    return AdapterSpec(Mixture(tuple(weights), tuple(weights.values())), mode)


@pytest.fixture
def experts(loaded_bundle):
    return {name: entry.path for name, entry in loaded_bundle.experts.items()}


def make_cache(experts, tmp_path, fake_engine=None, max_lora_rank=16, max_entries=8) -> AdapterCache:
    return AdapterCache(experts, tmp_path / "composites", max_lora_rank, max_entries, fake_engine)


def test_single_expert_at_weight_one_uses_its_own_folder(experts, tmp_path):
    cache = make_cache(experts, tmp_path)
    lease = asyncio.run(cache.acquire(spec(alpha=1.0)))
    assert lease.outcome == "expert" and lease.key is None
    assert lease.target.path == str(experts["alpha"]) and lease.target.name == "expert-alpha"
    assert not list((tmp_path / "composites").iterdir())


def test_composite_is_exact_and_written_once(experts, tmp_path):
    cache = make_cache(experts, tmp_path)
    mix = spec(alpha=0.75, gamma=-0.25)

    async def twice():
        first = await cache.acquire(mix)
        cache.release(first)
        second = await cache.acquire(mix)
        cache.release(second)
        return first, second

    first, second = asyncio.run(twice())
    assert (first.outcome, second.outcome) == ("miss", "hit")
    assert first.build_seconds is not None and first.build_seconds > 0 and first.svd_error is None
    assert first.target == second.target
    composite = load_adapter(first.target.path)
    assert composite.r == 16
    expected = compose_exact([load_adapter(experts["alpha"]), load_adapter(experts["gamma"])], [0.75, -0.25])
    for module in expected.modules():
        torch.testing.assert_close(delta_weight(composite, module), delta_weight(expected, module))


def test_linear_mode_uses_the_papers_merge(experts, tmp_path):
    cache = make_cache(experts, tmp_path)
    lease = asyncio.run(cache.acquire(spec("linear", alpha=0.6, beta=0.4)))
    merged = merge_linear([load_adapter(experts["alpha"]), load_adapter(experts["beta"])], [0.6, 0.4])
    composite = load_adapter(lease.target.path)
    assert composite.r == 8
    for module in merged.modules():
        torch.testing.assert_close(delta_weight(composite, module), delta_weight(merged, module))


def test_sixteen_concurrent_requests_build_once(experts, tmp_path, monkeypatch):
    cache = make_cache(experts, tmp_path)
    builds = []
    real_build = cache._build

    def counting_build(*args):
        builds.append(args[0])
        return real_build(*args)

    monkeypatch.setattr(cache, "_build", counting_build)
    mix = spec(alpha=0.5, beta=0.5)

    async def sixteen():
        leases = await asyncio.gather(*(cache.acquire(mix) for _ in range(16)))
        for lease in leases:
            cache.release(lease)
        return leases

    leases = asyncio.run(sixteen())
    assert len(builds) == 1
    assert sorted(lease.outcome for lease in leases) == ["hit"] * 15 + ["miss"]
    assert len({lease.target for lease in leases}) == 1
    assert cache._users == {}


def test_lru_evicts_idle_composites_from_disk_and_vllm(experts, tmp_path, fake_engine):
    cache = make_cache(experts, tmp_path, fake_engine, max_entries=2)
    a, b, c = spec(alpha=0.5, beta=0.5), spec(alpha=0.5, gamma=0.5), spec(beta=0.5, gamma=0.5)

    async def run():
        held_a = await cache.acquire(a)  # stays in use: never evicted
        lease_b = await cache.acquire(b)
        cache.release(lease_b)
        lease_c = await cache.acquire(c)  # 3 > 2: evicts b, the LRU idle one
        cache.release(lease_c)
        return held_a, lease_b, lease_c

    held_a, lease_b, lease_c = asyncio.run(run())
    assert lease_c.evictions == 1
    assert fake_engine.removed == [lease_b.target.lora_id]
    assert not (tmp_path / "composites" / lease_b.key).exists()
    assert cache.entries == [held_a.key, lease_c.key]

    async def rebuild_b():
        cache.release(held_a)
        lease = await cache.acquire(b)  # built again; now a is idle and the oldest
        cache.release(lease)
        return lease

    again = asyncio.run(rebuild_b())
    assert again.outcome == "miss" and again.evictions == 1 and again.target == lease_b.target
    assert fake_engine.removed[-1] == held_a.target.lora_id
    assert cache.entries == [lease_c.key, again.key]


def test_everything_in_use_stays_over_the_limit(experts, tmp_path, fake_engine):
    cache = make_cache(experts, tmp_path, fake_engine, max_entries=1)

    async def run():
        return [await cache.acquire(s) for s in (spec(alpha=0.5, beta=0.5), spec(alpha=0.5, gamma=0.5))]

    leases = asyncio.run(run())
    assert [l.evictions for l in leases] == [0, 0] and fake_engine.removed == []
    assert len(cache.entries) == 2


def test_composites_over_the_max_rank_are_svd_compressed(experts, tmp_path):
    cache = make_cache(experts, tmp_path, max_lora_rank=16)
    lease = asyncio.run(cache.acquire(spec(alpha=0.5, beta=0.3, gamma=0.2)))  # rank 24 > 16
    assert lease.outcome == "miss" and lease.svd_error is not None and 0 < lease.svd_error < 1
    assert load_adapter(lease.target.path).r == 16
    assert lease.key.endswith("-r16")


def test_lora_ids_are_stable_across_caches(experts, tmp_path):
    mix = spec(alpha=0.25, beta=0.75)
    first = asyncio.run(make_cache(experts, tmp_path / "one").acquire(mix))
    second = asyncio.run(make_cache(experts, tmp_path / "two").acquire(mix))
    assert first.target.lora_id == second.target.lora_id == stable_lora_id(first.target.name)
    assert first.target.lora_id != asyncio.run(make_cache(experts, tmp_path).acquire(spec(alpha=1.0))).target.lora_id


def test_folders_of_an_earlier_run_are_validated_and_reused(experts, tmp_path):
    mix, other = spec(alpha=0.5, beta=0.5), spec(beta=0.5, gamma=0.5)
    first = make_cache(experts, tmp_path)
    built = asyncio.run(first.acquire(mix))
    broken = asyncio.run(first.acquire(other))
    (tmp_path / "composites" / broken.key / "adapter_model.safetensors").write_bytes(b"not safetensors")

    restarted = make_cache(experts, tmp_path)
    assert sorted(restarted.entries) == sorted([built.key, broken.key])
    reused = asyncio.run(restarted.acquire(mix))
    assert reused.outcome == "hit" and reused.target == built.target
    rebuilt = asyncio.run(restarted.acquire(other))
    assert rebuilt.outcome == "miss"
    assert load_adapter(rebuilt.target.path).r == 16


def test_a_failed_build_fails_every_waiter_and_can_be_retried(experts, tmp_path, monkeypatch):
    cache = make_cache(experts, tmp_path)
    real_build = cache._build
    monkeypatch.setattr(cache, "_build", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    mix = spec(alpha=0.5, beta=0.5)

    async def four():
        return await asyncio.gather(*(cache.acquire(mix) for _ in range(4)), return_exceptions=True)

    results = asyncio.run(four())
    assert all(isinstance(r, InternalError) and "disk full" in str(r) for r in results)
    assert cache._users == {} and cache._pending == {}
    monkeypatch.setattr(cache, "_build", real_build)
    assert asyncio.run(cache.acquire(mix)).outcome == "miss"


def test_unknown_expert_is_refused(experts, tmp_path):
    cache = make_cache(experts, tmp_path)
    with pytest.raises(InvalidMixture):
        asyncio.run(cache.acquire(spec(delta=1.0)))
    with pytest.raises(InvalidMixture):
        asyncio.run(cache.acquire(spec(alpha=0.5, delta=0.5)))
    assert cache._users == {}


def test_saved_expert_folders_are_unchanged(experts, tmp_path):
    before = {n: (p / "adapter_model.safetensors").read_bytes() for n, p in experts.items()}
    asyncio.run(make_cache(experts, tmp_path).acquire(spec(alpha=0.5, beta=0.5)))
    assert before == {n: (p / "adapter_model.safetensors").read_bytes() for n, p in experts.items()}
