"""The load generator against an in-process fake OpenAI server (a mock HTTP transport): no real server."""

from __future__ import annotations

import asyncio
import importlib
import json
import math

import openai
import pytest

from benchmarks import loadgen
from benchmarks.stats import summarise

# the HTTP library of the openai client (httpx, or httpx2 in recent releases): its MockTransport and Response
http = importlib.import_module(openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0])


class FakeServer:
    """Streams `max_tokens` one-character chunks per completion, then a usage chunk; counts what it saw."""

    def __init__(self, fail_model: str | None = None, token_delay_s: float = 0.002):
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail_model = fail_model
        self.token_delay_s = token_delay_s

    async def handle(self, request: http.Request) -> http.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if body["model"] == self.fail_model:
            return http.Response(500, json={"error": {"message": "boom", "type": "internal", "code": None}})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            events = []
            for i in range(body["max_tokens"]):
                await asyncio.sleep(self.token_delay_s)
                events.append({"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "text": f"t{i}", "finish_reason": None}],
                               "mode_cotd": {"route": "gate", "experts": {"a": 1.0}}})
            events.append({"id": "c", "object": "text_completion", "created": 0, "model": body["model"], "choices": [],
                           "usage": {"prompt_tokens": 7, "completion_tokens": body["max_tokens"],
                                     "total_tokens": 7 + body["max_tokens"]}})
        finally:
            self.in_flight -= 1
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return http.Response(200, content=text.encode(), headers={"content-type": "text/event-stream"})

    def transport(self) -> http.MockTransport:
        return http.MockTransport(self.handle)


def _specs(n: int, model: str = "mode-cotd", tokens: int = 5) -> list[loadgen.RequestSpec]:
    return [loadgen.RequestSpec(model, f"prompt {i}", tokens, mixture={"a": 0.5, "b": 0.5} if i % 2 else None)
            for i in range(n)]


def test_closed_loop_keeps_concurrency_and_records_every_request():
    server = FakeServer()
    records = loadgen.run("http://fake", _specs(12), concurrency=3, transport=server.transport())
    assert [r.index for r in records] == list(range(12))
    assert server.max_in_flight <= 3 and len(server.bodies) == 12
    assert all(r.ok and r.output_tokens == 5 and r.prompt_tokens == 7 for r in records)
    assert all(r.ttft_s is not None and len(r.itl_s) == 4 for r in records)
    assert records[0].served == {"route": "gate", "experts": {"a": 1.0}}
    bodies = {b["prompt"]: b for b in server.bodies}
    body = bodies["prompt 1"]
    assert body["ignore_eos"] is True and body["mixture"] == {"a": 0.5, "b": 0.5}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True} and body["temperature"] == 0
    assert "mixture" not in bodies["prompt 0"]
    s = summarise(records)
    assert s["completed"] == 12 and s["output_tokens"] == 60


def test_failed_requests_are_recorded_not_raised():
    server = FakeServer(fail_model="bad")
    records = loadgen.run("http://fake", _specs(2) + _specs(2, model="bad"), concurrency=4,
                          transport=server.transport())
    assert [r.ok for r in records] == [True, True, False, False]
    assert "InternalServerError" in records[2].error
    assert summarise(records)["failed"] == 2


def test_open_loop_sends_at_poisson_times():
    server = FakeServer()
    records = loadgen.run("http://fake", _specs(6, tokens=2), rate=200.0, seed=1, transport=server.transport())
    offsets = loadgen.poisson_offsets(6, 200.0, seed=1)
    assert len(records) == 6 and all(r.ok for r in records)
    for record, offset in zip(records, offsets, strict=True):
        assert record.start_s >= offset - 1e-3  # never early


def test_poisson_offsets():
    offsets = loadgen.poisson_offsets(20000, 4.0, seed=0)
    gaps = [b - a for a, b in zip([0.0, *offsets], offsets, strict=False)]
    assert all(g > 0 for g in gaps)
    assert math.isclose(sum(gaps) / len(gaps), 0.25, rel_tol=0.05)
    assert loadgen.poisson_offsets(3, float("inf")) == [0.0, 0.0, 0.0]
    assert loadgen.poisson_offsets(5, 4.0, seed=2) == loadgen.poisson_offsets(5, 4.0, seed=2)
    with pytest.raises(ValueError):
        loadgen.poisson_offsets(3, 0.0)


def test_run_needs_exactly_one_mode():
    with pytest.raises(ValueError):
        loadgen.run("http://fake", [], concurrency=None, rate=None)
    with pytest.raises(ValueError):
        loadgen.run("http://fake", [], concurrency=2, rate=1.0)
