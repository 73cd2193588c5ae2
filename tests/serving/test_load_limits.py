"""Load: bounded admission (429 / 503 with Retry-After), per-request limits, and disconnects that abort generation.

All over the app with a fake engine (tests/serving/served.py); the same paths run under
Ray Serve in production. The real-server figures are in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from serving.errors import ServiceUnavailable
from serving.protocol import GenerationDelta
from serving.settings import ApiSettings, EngineSettings

from .conftest import FakeEngine
from .served import PROMPT, Served, assert_openai_error, built, completion


class SlowEngine(FakeEngine):
    """A FakeEngine that waits `first_delay` before the first token and `delay` between tokens."""

    def __init__(self, delay: float = 0.02, first_delay: float = 0.0):
        super().__init__()
        self.started = True
        self.delay = delay
        self.first_delay = first_delay
        self.running = 0

    async def generate(self, request_id, prompt_token_ids, sampling, lora):
        self.requests.append((request_id, list(prompt_token_ids), sampling, lora))
        self.running += 1
        finished = False
        try:
            await asyncio.sleep(self.first_delay)
            text = (f"[{lora.name if lora else 'base'}]" * 4)[: sampling.max_tokens]
            for index in range(sampling.n):
                for i, ch in enumerate(text):
                    await asyncio.sleep(self.delay)
                    last = i == len(text) - 1
                    yield GenerationDelta(index=index, text=ch, num_tokens=1,
                                          finish_reason=("length" if len(text) == sampling.max_tokens else "stop")
                                          if last else None)
            finished = True
        finally:
            self.running -= 1
            if not finished:  # closed or cancelled early: what vLLM calls an abort
                self.aborted.append(request_id)


class FailingEngine(FakeEngine):
    """Refuses every request when generation starts (as vLLM does when its queue is full)."""

    async def generate(self, request_id, prompt_token_ids, sampling, lora):
        raise ServiceUnavailable("the engine is overloaded")
        yield  # pragma: no cover - makes this an async generator


def asgi_scope(path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 5000),
            "server": ("testserver", 80)}


async def post_then_disconnect(app, body: dict, after_s: float, path: str = "/v1/completions") -> list[dict]:
    """Send `body`, go away after `after_s` seconds; return what the app sent."""
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await asyncio.sleep(after_s)
        return {"type": "http.disconnect"}

    messages: list[dict] = []

    async def send(message):
        messages.append(message)

    await asyncio.wait_for(app(asgi_scope(path), receive, send), 10)
    return messages


# ---------------------------------------------------------------------------- refusals


def test_429_and_503_carry_retry_after(tiny_bundle, tiny_student, tmp_path):
    s = Served(tiny_bundle, tiny_student, tmp_path, api=ApiSettings(max_inflight_requests=0, retry_after_s=3))
    s.engine.started = True
    response = completion(s, model="mode-cotd:alpha")
    assert_openai_error(response, 429, "rate_limit_exceeded")
    assert response.headers["retry-after"] == "3"
    s.engine.started = False
    s.settings.api.max_inflight_requests = 8
    response = completion(s, model="mode-cotd:alpha")
    assert_openai_error(response, 503, "model_loading")
    assert response.headers["retry-after"] == "3"


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_student_answers_503_before_any_work(tiny_bundle, tiny_student, tmp_path, stream):
    s = Served(tiny_bundle, tiny_student, tmp_path, engine_settings=EngineSettings(max_num_seqs=2,
                                                                                    max_queued_requests=1))
    s.engine.started = True
    assert s.service.max_open == 3
    s.service.open = 3  # three requests held elsewhere
    response = completion(s, model="mode-cotd", mixture={"alpha": 0.5, "beta": 0.5}, stream=stream)
    assert_openai_error(response, 503, "overloaded")
    assert s.engine.requests == [] and not built(s.service.cache)  # no build, no engine work
    s.service.open = 0
    assert completion(s, model="mode-cotd:alpha", stream=stream).status_code == 200


def test_a_stream_that_fails_at_its_start_gets_an_http_status_not_an_event(tiny_bundle, tiny_student, tmp_path):
    engine = FailingEngine()
    engine.started = True
    s = Served(tiny_bundle, tiny_student, tmp_path, engine=engine)
    response = completion(s, model="mode-cotd:alpha", stream=True)
    assert_openai_error(response, 503, "overloaded")
    assert s.sample("mode_cotd_queue_depth_requests", {"stage": "ingress"}) == 0


def test_overload_refuses_fast_and_completes_every_accepted_request(tiny_bundle, tiny_student, tmp_path):
    """A burst of 4x what the student holds: the rest get 503 + Retry-After at once, the accepted all finish."""
    engine = SlowEngine(delay=0.01)
    s = Served(tiny_bundle, tiny_student, tmp_path, engine=engine,
               engine_settings=EngineSettings(max_num_seqs=4, max_queued_requests=4))

    async def burst():
        transport = httpx.ASGITransport(app=s.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            async def one(i):
                started = time.perf_counter()
                r = await client.post("/v1/completions", json={"model": "mode-cotd:beta", "prompt": f"{PROMPT} {i}",
                                                                "max_tokens": 16})
                return r, time.perf_counter() - started
            return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(burst())
    ok = [(r, t) for r, t in results if r.status_code == 200]
    refused = [(r, t) for r, t in results if r.status_code != 200]
    assert len(ok) >= 8 and refused
    assert all(r.json()["choices"][0]["text"] == "[expert-beta][ex" for r, _ in ok)
    for r, seconds in refused:
        assert_openai_error(r, 503, "overloaded")
        assert seconds < 5.0
    assert s.service.open == 0 and engine.running == 0


# ---------------------------------------------------------------------------- per-request limits


def test_body_over_the_limit_is_413_before_it_is_read(tiny_bundle, tiny_student, tmp_path):
    s = Served(tiny_bundle, tiny_student, tmp_path, api=ApiSettings(max_body_bytes=4096))
    s.engine.started = True
    big = json.dumps({"model": "mode-cotd:alpha", "prompt": "x" * 5000})
    assert_openai_error(s.client.post("/v1/completions", content=big,
                                      headers={"content-type": "application/json"}), 413, "request_too_large")

    def chunks():  # no Content-Length: chunked transfer, counted as it arrives
        yield big[:3000].encode()
        yield big[3000:].encode()

    assert_openai_error(s.client.post("/v1/completions", content=chunks(),
                                      headers={"content-type": "application/json"}), 413, "request_too_large")
    assert s.sample("mode_cotd_requests_total", {"status": "413"}) == 2
    assert completion(s, model="mode-cotd:alpha").status_code == 200


@pytest.mark.parametrize(
    "api, body, param",
    [
        (ApiSettings(max_prompt_tokens=5), {"prompt": PROMPT}, "prompt"),
        (ApiSettings(max_output_tokens=16), {"max_tokens": 17}, "max_tokens"),
        (ApiSettings(max_n=2), {"n": 3}, "n"),
        (ApiSettings(), {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (ApiSettings(max_stop_strings=1), {"stop": ["a", "b"]}, "stop"),
        (ApiSettings(), {"logprobs": 21}, "logprobs"),
    ],
)
def test_per_request_limits(tiny_bundle, tiny_student, tmp_path, api, body, param):
    s = Served(tiny_bundle, tiny_student, tmp_path, api=api)
    s.engine.started = True
    error = assert_openai_error(completion(s, model="mode-cotd:alpha", **body), 400)
    assert error["param"] == param
    assert s.engine.requests == []


def test_max_output_tokens_caps_the_default(tiny_bundle, tiny_student, tmp_path):
    s = Served(tiny_bundle, tiny_student, tmp_path, api=ApiSettings(max_output_tokens=3))
    s.engine.started = True
    response = s.client.post("/v1/completions", json={"model": "mode-cotd:alpha", "prompt": PROMPT})
    assert response.status_code == 200 and s.engine.requests[-1][2].max_tokens == 3


# ---------------------------------------------------------------------------- disconnects


def test_a_non_streaming_client_that_goes_away_aborts_its_generation(tiny_bundle, tiny_student, tmp_path):
    engine = SlowEngine(delay=0.05)  # 8 tokens: 0.4 s
    s = Served(tiny_bundle, tiny_student, tmp_path, engine=engine)
    body = {"model": "mode-cotd", "prompt": PROMPT, "max_tokens": 8, "mixture": {"alpha": 0.5, "gamma": 0.5}}
    started = time.perf_counter()
    messages = asyncio.run(post_then_disconnect(s.app, body, after_s=0.15))
    assert time.perf_counter() - started < 0.4
    assert engine.aborted == [engine.requests[-1][0]] and engine.running == 0
    assert messages[0]["status"] == 499
    assert s.service.open == 0 and s.service.cache._users == {}
    assert s.sample("mode_cotd_queue_depth_requests", {"stage": "ingress"}) == 0
    assert s.sample("mode_cotd_client_disconnects_total", {"stream": "false"}) == 1


def test_a_streaming_client_that_goes_away_before_the_first_token_aborts_it(tiny_bundle, tiny_student, tmp_path):
    engine = SlowEngine(first_delay=5.0)
    s = Served(tiny_bundle, tiny_student, tmp_path, engine=engine)
    body = {"model": "mode-cotd:alpha", "prompt": PROMPT, "max_tokens": 8, "stream": True}
    started = time.perf_counter()
    asyncio.run(post_then_disconnect(s.app, body, after_s=0.1))
    assert time.perf_counter() - started < 2.0
    assert engine.aborted == [engine.requests[-1][0]] and engine.running == 0
    assert s.service.open == 0


def test_streaming_clients_that_go_away_mid_stream_leave_nothing_running(tiny_bundle, tiny_student, tmp_path):
    engine = SlowEngine(delay=0.05)
    s = Served(tiny_bundle, tiny_student, tmp_path, engine=engine)

    async def ten():
        bodies = [{"model": "mode-cotd:beta", "prompt": f"{PROMPT} {i}", "max_tokens": 30, "stream": True}
                  for i in range(10)]
        return await asyncio.gather(*(post_then_disconnect(s.app, b, after_s=0.2) for b in bodies))

    outs = asyncio.run(ten())
    assert all(any(m.get("type") == "http.response.body" and m.get("body", b"").startswith(b"data: {") for m in o)
               for o in outs), "each client got chunks before it left"
    assert sorted(engine.aborted) == sorted(r[0] for r in engine.requests) and engine.running == 0
    assert s.service.open == 0
    assert s.sample("mode_cotd_client_disconnects_total", {"stream": "true"}) == 10
    assert s.sample("mode_cotd_engine_unfinished_requests") == 0 and s.sample("mode_cotd_student_open_requests") == 0
