"""The OpenAI HTTP surface over the plain classes (LocalBackend, real gate and adapter cache, fake engine)."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from starlette.requests import Request

from serving.handler import OpenAIHandler
from serving.schemas import CompletionRequest
from serving.settings import ApiSettings

from .served import PROMPT, Served, assert_openai_error, completion


def test_health_is_503_until_the_student_is_loaded(tiny_bundle, tiny_student, tmp_path):
    s = Served(tiny_bundle, tiny_student, tmp_path)
    assert s.client.get("/health").status_code == 503
    assert_openai_error(completion(s, model="mode-cotd:alpha"), 503, "model_loading")
    s.engine.started = True
    assert s.client.get("/health").json() == {"status": "ok"}
    assert completion(s, model="mode-cotd:alpha").status_code == 200


def test_models_lists_every_route(served):
    data = served.client.get("/v1/models").json()
    assert data["object"] == "list"
    ids = [m["id"] for m in data["data"]]
    assert ids == ["mode-cotd", "mode-cotd:alpha", "mode-cotd:beta", "mode-cotd:gamma",
                   "mode-cotd:all_three", "mode-cotd:paper_mix", served.student_name]
    assert data["data"][0]["mode_cotd"]["route"] == "gate"
    assert {m["mode_cotd"]["shared"] for m in data["data"]} == {None}  # no shared adapter in this bundle


@pytest.mark.parametrize(
    "body, route, adapter_prefix",
    [
        ({"model": "mode-cotd"}, "gate", None),
        ({"model": "mode-cotd:beta"}, "expert", "expert-beta"),
        ({"model": "mode-cotd:all_three"}, "composition", "composite-exact-"),
        ({"model": "mode-cotd:paper_mix"}, "composition", "composite-linear-"),
        ({"model": "mode-cotd", "mixture": {"alpha": 0.5, "gamma": 0.5}}, "mixture", "composite-exact-"),
        ({"model": "STUDENT"}, "base", None),
    ],
)
def test_completion_per_route(served, body, route, adapter_prefix):
    if body["model"] == "STUDENT":
        body["model"] = served.student_name
    response = completion(served, **body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "text_completion" and data["model"] == body["model"]
    assert data["id"].startswith("cmpl-")
    served_by = data["mode_cotd"]
    assert served_by["route"] == route
    _, prompt_ids, sampling, lora = served.engine.requests[-1]
    assert prompt_ids == served.prompts.tokenizer(PROMPT)["input_ids"] and sampling.max_tokens == 8
    if route == "base":
        assert served_by["experts"] == {} and served_by["adapter"] is None and lora is None
        assert sampling.end_markers == ()  # the bare student is not held to the experts' format
    else:
        assert sampling.end_markers == (" END",)
        assert served_by["experts"] and abs(sum(served_by["experts"].values()) - 1.0) < 1e-9
        assert served_by["adapter"] == lora.name
        if adapter_prefix:
            assert lora.name.startswith(adapter_prefix)
    assert data["choices"][0]["text"] == (f"[{lora.name if lora else 'base'}]" * 4)[:8]
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 8
    assert data["usage"]["prompt_tokens"] == len(prompt_ids)


def test_gate_route_uses_the_gates_mixture(served):
    data = completion(served, model="mode-cotd").json()
    again = completion(served, model="mode-cotd").json()  # the gate is deterministic
    experts = data["mode_cotd"]["experts"]
    assert experts == again["mode_cotd"]["experts"] == served.router.decide([PROMPT])[0].mixture.as_dict()
    assert served.engine.requests[-1][3].name == data["mode_cotd"]["adapter"]


def test_chat_uses_the_chat_template(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    response = served.client.post("/v1/chat/completions",
                                  json={"model": "mode-cotd:alpha", "messages": messages, "max_tokens": 5})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "[expe"}
    expected = served.prompts.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert served.engine.requests[-1][1] == served.prompts.tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert data["mode_cotd"] == {"route": "expert", "name": "alpha", "experts": {"alpha": 1.0},
                                 "adapter": "expert-alpha"}


def sse_events(response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_streamed_completion_ends_with_done(served):
    body = {"model": "mode-cotd:gamma", "prompt": PROMPT, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    with served.client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["mode_cotd"]["experts"] == {"gamma": 1.0} for c in chunks)
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == "[exper"
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6


def test_a_slow_stream_sends_data_events_only(served, monkeypatch):
    # sse-starlette's keep-alive comment (": ping", every 15 s by default) broke `vllm bench serve`:
    # its parser kept the comment in its buffer and dropped every later event. Pings every 10 ms
    # here, and 4 tokens 50 ms apart: a ping would land in the stream unless it is turned off.
    from sse_starlette import EventSourceResponse

    monkeypatch.setattr(EventSourceResponse, "DEFAULT_PING_INTERVAL", 0.01)
    served.engine.token_delay = 0.05
    body = {"model": "mode-cotd:gamma", "prompt": PROMPT, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with served.client.stream("POST", "/v1/completions", json=body) as response:
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), raw
    assert events[-1] == "data: [DONE]" and len(events) == 4 + 2  # 4 tokens, usage, [DONE]


def test_streamed_chat_sends_the_role_first(served):
    body = {"model": served.student_name, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4, "stream": True}
    with served.client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["delta"]["role"] is None for c in chunks[1:])
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "[bas"
    assert chunks[0]["mode_cotd"]["route"] == "base"


def test_openai_client(served):
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=served.client, max_retries=0)
    out = client.completions.create(model="mode-cotd:all_three", prompt=PROMPT, max_tokens=4, temperature=0)
    assert out.model_extra["mode_cotd"]["route"] == "composition"
    chat = client.chat.completions.create(model="mode-cotd", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.content and chat.model_extra["mode_cotd"]["route"] == "gate"
    chunks = list(client.chat.completions.create(
        model="mode-cotd", messages=[{"role": "user", "content": PROMPT}], max_tokens=4, stream=True,
        extra_body={"mixture": {"alpha": 0.25, "beta": 0.75}}))
    assert chunks[0].model_extra["mode_cotd"]["experts"] == {"alpha": 0.25, "beta": 0.75}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    models = client.models.list()
    assert models.data[0].id == "mode-cotd"


def test_logprobs_and_n(served):
    data = completion(served, model="mode-cotd:alpha", logprobs=2, n=2).json()
    assert [c["index"] for c in data["choices"]] == [0, 1]
    lp = data["choices"][0]["logprobs"]
    assert lp["tokens"] == list("[expert-") and lp["token_logprobs"] == [-0.5] * 8
    assert lp["text_offset"] == list(range(8)) and lp["top_logprobs"][0] == {"[": -0.5}
    assert data["usage"]["completion_tokens"] == 16
    chat = served.client.post("/v1/chat/completions", json={
        "model": "mode-cotd:alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
        "logprobs": True, "top_logprobs": 1}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert content[0]["token"] == "[" and content[0]["bytes"] == [91] and content[0]["top_logprobs"][0]["logprob"] == -0.5
    assert served.engine.requests[-1][2].logprobs == 1


def test_vllm_sampling_extensions_reach_the_engine(served):
    """What `vllm bench serve` sends beyond OpenAI's fields (top_k, min_p, repetition_penalty), and logit_bias."""
    body = {"top_k": 20, "min_p": 0.1, "repetition_penalty": 1.2, "logit_bias": {"5": -100, "9": 2.5}}
    assert completion(served, model="mode-cotd:alpha", **body).status_code == 200
    sampling = served.engine.requests[-1][2]
    assert (sampling.top_k, sampling.min_p, sampling.repetition_penalty) == (20, 0.1, 1.2)
    assert sampling.logit_bias == {5: -100.0, 9: 2.5}
    completion(served, model="mode-cotd:alpha")
    assert served.engine.requests[-1][2].logit_bias is None and served.engine.requests[-1][2].top_k == 0


@pytest.mark.parametrize(
    "raw, status, code",
    [
        ('{"model": "mode-cotd", "prompt": ', 400, None),
        ('{"model": "nope", "prompt": "hi"}', 404, "model_not_found"),
        ('{"model": "mode-cotd:alpha", "prompt": "hi", "max_tokens": -1}', 400, None),
        ('{"model": "mode-cotd:alpha", "prompt": "hi", "max_tokens": 0}', 400, None),
        ('{"model": "mode-cotd:alpha", "prompt": "hi", "max_tokens": 1000000000}', 400, "context_length_exceeded"),
        ('{"model": "mode-cotd", "prompt": "hi", "mixture": {"delta": 1}}', 400, "invalid_mixture"),
        ('{"model": "mode-cotd", "prompt": "hi", "mixture": {"alpha": NaN}}', 400, "invalid_mixture"),
        ('{"model": "mode-cotd", "prompt": "hi", "mixture": {"alpha": Infinity, "beta": 1}}', 400, "invalid_mixture"),
        ('{"model": "mode-cotd", "prompt": "hi", "mixture": {"alpha": -Infinity}}', 400, "invalid_mixture"),
        ('{"model": "mode-cotd:alpha", "prompt": ""}', 400, None),
        ('{"model": "mode-cotd:alpha", "prompt": []}', 400, None),
        ('{"model": "mode-cotd:alpha", "prompt": ["a", [1, 2]]}', 400, None),
        ('{"model": "mode-cotd:alpha", "prompt": ["a", ""]}', 400, None),
        ('{"model": "mode-cotd:alpha", "prompt": ["a", "b"], "stream": true}', 400, None),
        ('{"model": "mode-cotd:alpha", "prompt": "hi", "temperature": 5}', 400, None),
        ('{"model": "mode-cotd:alpha", "prompt": "hi", "n": 99}', 400, None),
        ('{"model": "mode-cotd:alpha", "prompt": "hi", "logprobs": 50}', 400, None),
        ('{"model": "mode-cotd:alpha", "prompt": "hi", "echo": true, "stream": true}', 400, None),
        ('{"model": "mode-cotd:alpha", "prompt": "hi", "use_beam_search": true}', 400, None),
        ('{"model": "mode-cotd:mixture:{\\"alpha\\": 0.5, \\"delta\\": 0.5}", "prompt": "hi"}', 400, "invalid_mixture"),
        ('{"model": "mode-cotd:mixture:alpha=half", "prompt": "hi"}', 400, "invalid_mixture"),
        ('{"model": "mode-cotd:alpha"}', 400, None),
        ('[1, 2]', 400, None),
    ],
)
def test_bad_completions_get_openai_errors_and_the_server_keeps_serving(served, raw, status, code):
    response = served.client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(response, status, code)
    assert completion(served, model="mode-cotd:alpha").status_code == 200


def test_prompt_over_the_context_length(served):
    long_prompt = "x" * (served.prompts.max_model_len + 10)
    error = assert_openai_error(completion(served, model="mode-cotd:alpha", prompt=long_prompt), 400,
                                "context_length_exceeded")
    assert "maximum context length" in error["message"]
    assert completion(served, model="mode-cotd:alpha").status_code == 200


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "user", "content": ""}], [{"role": "wizard", "content": "hi"}], "hello"],
)
def test_bad_chats(served, messages):
    response = served.client.post("/v1/chat/completions", json={"model": "mode-cotd:alpha", "messages": messages})
    assert_openai_error(response, 400)


def test_unknown_path_is_an_openai_404(served):
    assert_openai_error(served.client.get("/v1/nothing"), 404)


def test_overload_is_429(tiny_bundle, tiny_student, tmp_path):
    s = Served(tiny_bundle, tiny_student, tmp_path, api=ApiSettings(max_inflight_requests=0))
    s.engine.started = True
    assert_openai_error(completion(s, model="mode-cotd:alpha"), 429, "rate_limit_exceeded")


def test_metrics_count_requests_tokens_gate_and_composites(served):
    assert served.sample("mode_cotd_requests_total") == 0
    completion(served, model="mode-cotd")
    completion(served, model="mode-cotd", mixture={"beta": 0.5, "gamma": 0.5})
    completion(served, model="mode-cotd", mixture={"beta": 0.5, "gamma": 0.5})
    completion(served, model="nope")
    assert served.sample("mode_cotd_requests_total", {"route": "gate", "status": "200"}) == 1
    assert served.sample("mode_cotd_requests_total", {"route": "mixture", "endpoint": "/v1/completions"}) == 2
    assert served.sample("mode_cotd_requests_total", {"route": "none", "status": "404"}) == 1
    assert served.sample("mode_cotd_output_tokens_total", {"route": "mixture"}) == 16
    assert served.sample("mode_cotd_prompt_tokens_total", {"route": "gate"}) > 0
    assert served.sample("mode_cotd_gate_batch_size_requests_count") == 1
    assert served.sample("mode_cotd_gate_latency_seconds_count") == 1
    assert served.sample("mode_cotd_routed_weight_ratio_count") >= 1
    assert served.sample("mode_cotd_composite_cache_misses_total") >= 1
    assert served.sample("mode_cotd_composite_cache_hits_total") >= 1
    assert served.sample("mode_cotd_composite_builds_total") == served.sample("mode_cotd_composite_cache_misses_total")
    assert served.sample("mode_cotd_e2e_latency_seconds_count", {"route": "mixture"}) == 2
    assert served.sample("mode_cotd_time_to_first_token_seconds_count", {"route": "gate"}) == 1
    assert served.sample("mode_cotd_time_per_output_token_seconds_count", {"route": "gate"}) == 1
    assert served.sample("mode_cotd_queue_depth_requests", {"stage": "ingress"}) == 0
    text = served.client.get("/metrics").text
    for name in ("mode_cotd_lora_slots_in_use_adapters", "mode_cotd_composite_build_seconds_bucket",
                 "mode_cotd_composite_cache_evictions_total", "mode_cotd_composite_svd_error_ratio_bucket"):
        assert name in text


def test_svd_error_is_recorded_for_large_compositions(served):
    completion(served, model="mode-cotd:all_three")  # rank 24 > max rank 16 (k·r = 2·8)
    assert served.sample("mode_cotd_composite_svd_error_ratio_count") == 1


def test_a_client_that_goes_away_aborts_its_generation_and_frees_everything(served):
    handler = OpenAIHandler(served.backend, served.routes, served.prompts, served.settings.api, served.metrics)
    body = CompletionRequest(model="mode-cotd", prompt=PROMPT, max_tokens=20, stream=True,
                             mixture={"alpha": 0.5, "beta": 0.5})

    async def disconnect_after_two_chunks():
        async def connected():  # the client stays until sse-starlette is told otherwise
            await asyncio.Event().wait()

        http = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, connected)
        route = served.routes.resolve(body.model, body.mixture)
        rendered = served.prompts.completion(PROMPT)
        sampling = handler._sampling(body, route, rendered, 20, None, "logprobs")
        response = await handler._serve(http, handler._admit(), "completion", body, route, rendered, sampling)
        assert handler.inflight == 1 and served.service.cache._users  # adapter leased while streaming
        stream = response.body_iterator
        first, second = await anext(stream), await anext(stream)
        await stream.aclose()  # what sse-starlette does when the client disconnects
        assert served.engine.aborted == [served.engine.requests[-1][0]]
        assert handler.inflight == 0 and served.service.cache._users == {}
        return first, second

    first, second = asyncio.run(disconnect_after_two_chunks())
    assert [json.loads(c["data"])["choices"][0]["text"] for c in (first, second)] == ["[", "c"]
