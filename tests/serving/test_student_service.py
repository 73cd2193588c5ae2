"""The student service: adapter leased for exactly the life of a generation stream."""

from __future__ import annotations

import asyncio

import pytest

from mode_cotd.mixture import Mixture
from serving.adapter_cache import AdapterCache
from serving.errors import ServiceUnavailable
from serving.protocol import (
    AdapterSpec,
    GenerationDelta,
    GenerationRequest,
    GenerationStarted,
    SamplingSettings,
)
from serving.student_service import StudentService

from .conftest import FakeEngine


@pytest.fixture
def service(loaded_bundle, tmp_path) -> StudentService:
    engine = FakeEngine()
    experts = {name: entry.path for name, entry in loaded_bundle.experts.items()}
    return StudentService(engine, AdapterCache(experts, tmp_path, 16, 8, engine), replica="r1")


def request(adapter: AdapterSpec | None) -> GenerationRequest:
    return GenerationRequest("req-1", [5, 6, 7], SamplingSettings(max_tokens=5), adapter)


MIX = AdapterSpec(Mixture(("alpha", "beta"), (0.5, 0.5)))


def test_stream_starts_with_the_adapter_report_then_deltas(service):
    async def run():
        await service.start()
        return [e async for e in service.generate(request(MIX))]

    events = asyncio.run(run())
    started, deltas = events[0], events[1:]
    assert isinstance(started, GenerationStarted)
    report = started.adapter
    assert report.outcome == "miss" and report.lora_name.startswith("composite-exact-") and report.replica == "r1"
    assert report.build_seconds > 0
    assert all(isinstance(d, GenerationDelta) for d in deltas) and len(deltas) == 5
    assert service.engine.requests[0][3].name == report.lora_name
    assert service.cache._users == {}


def test_lease_is_released_when_the_client_goes_away(service):
    async def run():
        await service.start()
        stream = service.generate(request(MIX))
        await anext(stream)
        await anext(stream)
        assert service.cache._users  # held while streaming
        await stream.aclose()
        assert service.engine.aborted == ["req-1"]  # the engine request is aborted at once, not at GC

    asyncio.run(run())
    assert service.cache._users == {}


def test_base_requests_have_no_adapter(service):
    async def run():
        await service.start()
        return [e async for e in service.generate(request(None))]

    events = asyncio.run(run())
    assert events[0].adapter.outcome == "none" and events[0].adapter.lora_name is None
    assert service.engine.requests[0][3] is None


def test_not_ready_is_503(service):
    async def run():
        return [e async for e in service.generate(request(None))]

    with pytest.raises(ServiceUnavailable):
        asyncio.run(run())
