"""Faults: the gate failing or timing out (fallback route + metric), composites that fail to build or rot on
disk (reported, not cached; detected by checksum and rebuilt), and replica deaths mapped to clean 503s."""

from __future__ import annotations

import asyncio
import json
import os
import time
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError

from mode_cotd.errors import ConfigError
from mode_cotd.mixture import Mixture
from serving.adapter_cache import LEFTOVER_AGE_S, AdapterCache
from serving.deployments import as_api_error
from serving.errors import InternalError, ServiceUnavailable
from serving.protocol import AdapterSpec
from serving.sealed import CHECKSUMS
from serving.settings import ApiSettings

from .conftest import FakeEngine
from .served import Served, assert_openai_error, completion

MIX = AdapterSpec(Mixture(("alpha", "beta"), (0.5, 0.5)))


# ---------------------------------------------------------------------------- gate fallback


def broken_gate(s: Served, how: str):
    async def route(text):
        if how == "error":
            raise RuntimeError("the gate replica crashed")
        if how == "overloaded":
            raise ServiceUnavailable("the router's queue is full")
        await asyncio.sleep(10)

    s.backend.route = route


@pytest.mark.parametrize("how, reason", [("error", "error"), ("slow", "timeout")])
def test_a_failed_or_slow_gate_falls_back_to_the_student(tiny_bundle, tiny_student, tmp_path, how, reason):
    s = Served(tiny_bundle, tiny_student, tmp_path, api=ApiSettings(gate_timeout_s=0.2))
    s.engine.started = True
    broken_gate(s, how)
    started = time.perf_counter()
    response = completion(s, model="mode-cotd")
    assert response.status_code == 200, response.text
    assert time.perf_counter() - started < 5
    served_by = response.json()["mode_cotd"]
    assert served_by == {"route": "gate", "name": None, "experts": {}, "adapter": None, "fallback": reason}
    assert s.engine.requests[-1][3] is None  # the bare student
    assert s.sample("mode_cotd_gate_fallbacks_total", {"reason": reason}) == 1


def test_the_fallback_can_be_an_expert_or_nothing(tiny_bundle, tiny_student, tmp_path):
    s = Served(tiny_bundle, tiny_student, tmp_path, api=ApiSettings(gate_fallback="beta"))
    s.engine.started = True
    broken_gate(s, "error")
    data = completion(s, model="mode-cotd", stream=False).json()
    assert data["mode_cotd"]["experts"] == {"beta": 1.0} and data["mode_cotd"]["adapter"] == "expert-beta"
    assert data["mode_cotd"]["fallback"] == "error"

    s = Served(tiny_bundle, tiny_student, tmp_path, api=ApiSettings(gate_fallback=None))
    s.engine.started = True
    broken_gate(s, "error")
    assert_openai_error(completion(s, model="mode-cotd"), 503, "gate_unavailable")
    with pytest.raises(ConfigError, match="gate_fallback 'omega'"):
        Served(tiny_bundle, tiny_student, tmp_path, api=ApiSettings(gate_fallback="omega"))


def test_an_overloaded_router_is_503_not_a_fallback(served):
    broken_gate(served, "overloaded")
    assert_openai_error(completion(served, model="mode-cotd"), 503, "overloaded")
    assert served.sample("mode_cotd_gate_fallbacks_total") == 0


def test_a_working_gate_says_nothing_about_fallbacks(served):
    data = completion(served, model="mode-cotd").json()
    assert "fallback" not in data["mode_cotd"] and data["mode_cotd"]["experts"]


# ---------------------------------------------------------------------------- replica deaths


def test_replica_deaths_and_backpressure_become_503s():
    died = as_api_error(ActorDiedError())
    assert isinstance(died, ServiceUnavailable) and died.code == "replica_unavailable"
    full = as_api_error(BackPressureError(num_queued_requests=8, max_queued_requests=8))
    assert isinstance(full, ServiceUnavailable) and full.code == "overloaded"
    inner = ServiceUnavailable("the student holds 192 requests")
    assert as_api_error(RayTaskError("generate", "tb", inner)) is inner
    assert isinstance(as_api_error(ValueError("x")), InternalError)


# ---------------------------------------------------------------------------- composites


@pytest.fixture
def experts(loaded_bundle):
    return {name: entry.path for name, entry in loaded_bundle.experts.items()}


def build(cache: AdapterCache, spec: AdapterSpec = MIX):
    async def run():
        lease = await cache.acquire(spec)
        cache.release(lease)
        return lease

    return asyncio.run(run())


def test_a_composite_that_fails_to_build_is_reported_and_not_cached(tiny_bundle, tiny_student, tmp_path,
                                                                   monkeypatch):
    s = Served(tiny_bundle, tiny_student, tmp_path)
    s.engine.started = True
    cache = s.service.cache
    real = cache._build
    monkeypatch.setattr(cache, "_build", lambda spec, folder: (_ for _ in ()).throw(OSError("disk full")))
    body = {"model": "mode-cotd", "mixture": {"alpha": 0.5, "beta": 0.5}}
    error = assert_openai_error(completion(s, **body), 500, "adapter_build_failed")
    assert "disk full" in error["message"]
    assert cache.entries == [] and not any(cache.cache_dir.iterdir())
    assert s.sample("mode_cotd_composite_build_failures_total") == 1
    monkeypatch.setattr(cache, "_build", real)  # the disk has room again: the next request builds it
    data = completion(s, **body).json()
    assert data["mode_cotd"]["adapter"].startswith("composite-exact-")
    assert s.sample("mode_cotd_composite_builds_total") == 1


def flip_a_byte(path, keep_mtime: bool = True):
    """Corrupt a tensor byte in place; the size, and the mtime if asked, stay the same (bit rot)."""
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_corrupt_composite_is_found_by_its_checksum_on_restart_and_rebuilt(experts, tmp_path):
    engine = FakeEngine()
    cache = AdapterCache(experts, tmp_path, 16, 8, engine)
    first = build(cache)
    folder = cache.cache_dir / first.key
    recorded = json.loads((folder / CHECKSUMS).read_text())
    assert set(recorded) == {"adapter_config.json", "adapter_model.safetensors"}
    flip_a_byte(folder / "adapter_model.safetensors")  # still a loadable safetensors file

    restarted = AdapterCache(experts, tmp_path, 16, 8, engine)
    assert restarted.entries == [first.key]
    again = build(restarted)
    assert again.outcome == "miss"  # rebuilt, not served
    assert engine.removed == [first.target.lora_id]  # and vLLM's copy dropped first
    assert json.loads((folder / CHECKSUMS).read_text()) == recorded  # the same bytes as the first build
    assert build(restarted).outcome == "hit"


def test_a_composite_changed_while_serving_is_checked_again_and_rebuilt(experts, tmp_path):
    cache = AdapterCache(experts, tmp_path, 16, 8, FakeEngine())
    first = build(cache)
    flip_a_byte(cache.cache_dir / first.key / "adapter_model.safetensors", keep_mtime=False)
    assert build(cache).outcome == "miss"
    assert build(cache).outcome == "hit"


@pytest.mark.parametrize("damage", ["no_checksums", "truncated", "extra_pickle"])
def test_half_written_or_tampered_composites_are_never_served(experts, tmp_path, damage):
    cache = AdapterCache(experts, tmp_path, 16, 8, FakeEngine())
    folder = cache.cache_dir / build(cache).key
    if damage == "no_checksums":  # killed after the folder was renamed, before its checksums were written
        (folder / CHECKSUMS).unlink()
    elif damage == "truncated":
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickled")
    restarted = AdapterCache(experts, tmp_path, 16, 8, FakeEngine())
    assert build(restarted).outcome == "miss"
    assert not (folder / "adapter_model.bin").exists()


def test_leftovers_of_interrupted_writes_are_removed_and_symlinks_never_adopted(experts, tmp_path):
    cache_dir = tmp_path / "c"
    cache_dir.mkdir()
    old = cache_dir / ".exact-0123456789abcdef-r16.abc123.tmp"
    young = cache_dir / ".exact-fedcba9876543210-r16.def456.tmp"
    for leftover in (old, young):
        leftover.mkdir()
        (leftover / "adapter_model.safetensors").write_bytes(b"partial")
    past = time.time() - LEFTOVER_AGE_S - 10
    os.utime(old, (past, past))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (cache_dir / "exact-aaaaaaaaaaaaaaaa-r16").symlink_to(outside, target_is_directory=True)
    cache = AdapterCache(experts, cache_dir, 16, 8, FakeEngine())
    assert not old.exists() and young.exists()  # a young one may be another replica's write in progress
    assert cache.entries == []


class _FakeStream:
    """A DeploymentResponseGenerator stand-in: yields `items`, then (if `hang`) waits forever."""

    def __init__(self, items, hang=False):
        self.items, self.hang, self.cancelled = list(items), hang, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.items:
            return self.items.pop(0)
        if self.hang:
            await asyncio.Event().wait()
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class _FakeStudentHandle:
    def __init__(self, stream):
        self.stream = stream
        self.generate = SimpleNamespace(remote=lambda request: self.stream)

    def options(self, stream):
        assert stream is True
        return self


def _collect(backend, request=None):
    async def run():
        return [event async for event in backend.generate(request)]
    return asyncio.run(run())


def test_no_student_replica_taking_the_request_is_a_503_after_the_wait_timeout():
    """While the student restarts Serve holds requests; the ingress gives up after student_wait_timeout_s."""
    from serving.deployments import ADMITTED, RayBackend

    stream = _FakeStream([], hang=True)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as info:
        _collect(RayBackend(None, _FakeStudentHandle(stream), student_wait_timeout_s=0.2))
    assert 0.2 <= time.monotonic() - started < 5
    assert info.value.code == "student_unavailable" and info.value.status == 503 and stream.cancelled

    # A replica that takes the request in time: its events pass through; the marker does not.
    served = _FakeStream([ADMITTED, "started", "delta"])
    assert _collect(RayBackend(None, _FakeStudentHandle(served), student_wait_timeout_s=0.2)) == ["started", "delta"]
    assert not served.cancelled
    # Slow after admission (a long generation) is not a timeout.
    slow = _FakeStream([ADMITTED])
    assert _collect(RayBackend(None, _FakeStudentHandle(slow), student_wait_timeout_s=0.2)) == []
