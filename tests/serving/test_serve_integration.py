"""The whole app through Ray Serve on 127.0.0.1: tiny student, 3 tiny experts, compositions, a gate, vLLM.

One app for the module (started once, ~1 minute), checked with the official openai client:
every route answers completions, chats and streams with `mode_cotd` in each response;
greedy decoding is repeatable; /metrics counters move; 16 concurrent requests for a new
mixture go through the union (the pinned experts, nothing built), and for a mixture only a
composite can serve build it once; 32 concurrent gate requests reach the gate in batches; bad input
gets OpenAI-shaped 4xx errors and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mode_cotd.mixture import Mixture
from serving.settings import (
    ApiSettings,
    CacheSettings,
    EngineSettings,
    RouterSettings,
    ServeSettings,
)

from .serve_app import STARTUP_TIMEOUT_S, free_port, serve_app

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.ray]

PROMPT = "Infer the correct answer for the question.\n\nQ: Tom has 3 apples and buys 4 more. How many?\nA:"


class App:
    def __init__(self, base: str, student_name: str, startup_seconds: float):
        self.base = base
        self.student_name = student_name
        self.startup_seconds = startup_seconds
        self.client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)

    def aclient(self) -> openai.AsyncOpenAI:
        """A fresh async client (its connections belong to the event loop that uses them)."""
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=120)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        text = httpx.get(f"{self.base}/metrics", timeout=30).text
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()))

    def post(self, path: str, body: str) -> httpx.Response:
        return httpx.post(f"{self.base}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)


@pytest.fixture(scope="module")
def app(tiny_bundle, tiny_student, tmp_path_factory, heavy_lock_for_module):
    # heavy_lock_for_module holds /tmp/heavy.lock (or a parent process does)
    settings = tiny_app_settings(tiny_bundle, tiny_student, tmp_path_factory.mktemp("composites"), "mode-cotd-test")
    with serve_app(settings) as (base, startup_s):
        yield App(base, Path(tiny_student).name, startup_s)


def tiny_app_settings(bundle: Path, student: Path, composites: Path, name: str, **fields) -> ServeSettings:
    """The settings of a test app on the tiny student and bundle, on a free port; `fields` replace others."""
    return ServeSettings(**{
        "bundle": str(bundle), "student": str(student), "host": "127.0.0.1", "port": free_port(), "app_name": name,
        "engine": EngineSettings(max_model_len=1024, max_loras=4, max_cpu_loras=8, max_num_seqs=32,
                                 enforce_eager=True, kv_cache_memory_bytes=64 * 2**20),
        "batching": RouterSettings(max_batch_size=8, batch_wait_timeout_s=0.05),
        "cache": CacheSettings(dir=str(composites), max_entries=16),
        "api": ApiSettings(default_max_tokens=16), **fields})


ROUTES = [
    ("mode-cotd", None, "gate"),
    ("mode-cotd:alpha", None, "expert"),
    ("mode-cotd:all_three", None, "composition"),
    ("STUDENT", None, "base"),
    ("mode-cotd", {"alpha": 0.5, "beta": 0.5}, "mixture"),
]


@pytest.mark.parametrize("model, mixture, route", ROUTES)
def test_completion_chat_and_stream_per_route(app, model, mixture, route):
    model = app.student_name if model == "STUDENT" else model
    extra = {"extra_body": {"mixture": mixture}} if mixture else {}

    out = app.client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, **extra)
    served = out.model_extra["mode_cotd"]
    assert served["route"] == route and out.usage.prompt_tokens > 0
    assert out.usage.completion_tokens == 12 or out.choices[0].finish_reason == "stop"
    if route == "base":
        assert served["experts"] == {} and served["adapter"] is None
    else:
        assert served["experts"] and served["adapter"]
    if mixture:
        assert served["experts"] == mixture

    chat = app.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0, **extra)
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    assert chat.model_extra["mode_cotd"]["route"] == route

    chunks = list(app.client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                                stream=True, **extra))
    assert chunks and all(c.model_extra["mode_cotd"]["route"] == route for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text

    chat_chunks = list(app.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, **extra))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert chat_chunks[-1].usage is not None and chat_chunks[-1].choices == []
    assert all(c.model_extra["mode_cotd"]["experts"] == chat.model_extra["mode_cotd"]["experts"] for c in chat_chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices) == chat.choices[0].message.content


def test_greedy_is_repeatable_and_adapters_change_the_output(app):
    texts = {}
    for model in ("mode-cotd", "mode-cotd:alpha", "mode-cotd:beta", app.student_name):
        first = app.client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
        second = app.client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
        assert first.choices[0].text == second.choices[0].text, model
        texts[model] = first.choices[0].text
    assert len(set(texts.values())) > 1, texts


def test_sampling_parameters_reach_vllm(app):
    greedy = app.client.completions.create(model="mode-cotd:beta", prompt=PROMPT, max_tokens=16, temperature=0,
                                           logprobs=2)
    text, logprobs = greedy.choices[0].text, greedy.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == greedy.usage.completion_tokens
    # as vLLM's server: each dict holds the token itself and its top 2 (3 entries when the token is not among them)
    assert "".join(logprobs.tokens) == text and all(len(top) <= 3 for top in logprobs.top_logprobs)
    assert all(logprobs.tokens[i] in top for i, top in enumerate(logprobs.top_logprobs))
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    if len(text) >= 6 and text[3:5].strip():
        stop = text[3:5]
        cut = app.client.completions.create(model="mode-cotd:beta", prompt=PROMPT, max_tokens=16, temperature=0,
                                            stop=[stop])
        assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"

    seeded = [app.client.completions.create(model="mode-cotd:beta", prompt=PROMPT, max_tokens=12, temperature=1.0,
                                            seed=7, n=2) for _ in range(2)]
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]
    assert [c.index for c in seeded[0].choices] == [0, 1]
    assert seeded[0].usage.completion_tokens > 12 or any(c.finish_reason == "stop" for c in seeded[0].choices)
    chat = app.client.chat.completions.create(model="mode-cotd", messages=[{"role": "user", "content": PROMPT}],
                                              max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) <= 2 and t.bytes is not None for t in content)


def wait_for_idle_engine(app, timeout_s: float = 20.0) -> float:
    """Seconds until vLLM's unfinished-request count (read live on /metrics) is 0."""
    started = time.monotonic()
    while app.metric("mode_cotd_engine_unfinished_requests") > 0 or app.metric("mode_cotd_student_open_requests") > 0:
        assert time.monotonic() - started < timeout_s, "generation kept running for a client that left"
        time.sleep(0.2)
    return time.monotonic() - started


def test_a_client_that_disconnects_mid_stream_frees_the_engine(app):
    stream = app.client.completions.create(model=app.student_name, prompt=PROMPT, max_tokens=900, temperature=0,
                                           stream=True)
    next(iter(stream))
    stream.close()  # the client goes away after the first token
    wait_for_idle_engine(app)
    app.client.completions.create(model=app.student_name, prompt=PROMPT, max_tokens=1)
    # the engine's unfinished requests, read when that last request started: the abandoned one was aborted
    assert app.metric("mode_cotd_queue_depth_requests", {"stage": "engine"}) == 0


def test_a_non_streaming_client_that_gives_up_frees_the_engine(app):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{app.base}/v1/completions", timeout=1.0, json={
            "model": app.student_name, "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "ignore_eos": True})
    wait_for_idle_engine(app)


def test_limits_and_refusals_through_serve(app):
    big = json.dumps({"model": "mode-cotd:alpha", "prompt": "x" * (2**20 + 10)})
    response = app.post("/v1/completions", big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    response = app.post("/v1/completions", json.dumps({"model": "mode-cotd:alpha", "prompt": "hi", "n": 100}))
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_models_health_and_metrics_move(app):
    ids = [m.id for m in app.client.models.list().data]
    assert ids == ["mode-cotd", "mode-cotd:alpha", "mode-cotd:beta", "mode-cotd:gamma",
                   "mode-cotd:all_three", "mode-cotd:paper_mix", app.student_name]
    assert httpx.get(f"{app.base}/health").json() == {"status": "ok"}
    before = {name: app.metric(name) for name in (
        "mode_cotd_requests_total", "mode_cotd_output_tokens_total", "mode_cotd_prompt_tokens_total",
        "mode_cotd_e2e_latency_seconds_count", "mode_cotd_time_to_first_token_seconds_count",
        "mode_cotd_gate_batch_size_requests_count")}
    app.client.completions.create(model="mode-cotd", prompt=PROMPT, max_tokens=4, temperature=0)
    for name, value in before.items():
        assert app.metric(name) > value, name
    text = httpx.get(f"{app.base}/metrics").text
    assert "mode_cotd_lora_slots_in_use_adapters{" in text


def test_paper_linear_composition_and_svd_compressed_composite(app):
    linear = app.client.completions.create(model="mode-cotd:paper_mix", prompt=PROMPT, max_tokens=4)
    assert linear.model_extra["mode_cotd"]["adapter"].startswith("composite-linear-")
    three = {"alpha": 0.5, "beta": 0.5, "gamma": 0.5}  # sums to 1.5: not for the union; rank 24 > 16
    out = app.client.completions.create(model="mode-cotd", prompt=PROMPT, max_tokens=4, extra_body={"mixture": three})
    assert out.model_extra["mode_cotd"]["adapter"].startswith("composite-exact-")
    assert app.metric("mode_cotd_composite_svd_error_ratio_count") >= 1


def _sixteen(app, mixture: dict) -> list:
    async def sixteen():
        async with app.aclient() as client:
            return await asyncio.gather(*(
                client.completions.create(model="mode-cotd", prompt=f"{PROMPT} {i}", max_tokens=4,
                                          extra_body={"mixture": mixture})
                for i in range(16)))

    return asyncio.run(sixteen())


def test_sixteen_concurrent_requests_for_a_new_mixture_go_through_the_union(app):
    mixture = {"beta": 0.75, "gamma": 0.25}  # on the grid, summing to 1: a mixture id over the pinned experts
    builds, union = app.metric("mode_cotd_composite_builds_total"), app.metric("mode_cotd_mixture_union_requests_total")
    outs = _sixteen(app, mixture)
    assert all(o.model_extra["mode_cotd"]["experts"] == mixture for o in outs)
    assert {o.model_extra["mode_cotd"]["adapter"] for o in outs} == {f"mixture-{Mixture.from_dict(mixture, 0.05).digest}"}
    assert app.metric("mode_cotd_composite_builds_total") == builds
    assert app.metric("mode_cotd_mixture_union_requests_total") - union == 16


def test_sixteen_concurrent_requests_for_a_new_composite_build_it_once(app):
    mixture = {"beta": 1.25, "gamma": -0.25}  # a negative weight: the union cannot encode it, a composite does
    builds, misses, hits = (app.metric(f"mode_cotd_composite_{n}_total") for n in ("builds", "cache_misses", "cache_hits"))
    outs = _sixteen(app, mixture)
    assert all(o.model_extra["mode_cotd"]["experts"] == mixture for o in outs)
    assert len({o.model_extra["mode_cotd"]["adapter"] for o in outs}) == 1
    assert app.metric("mode_cotd_composite_builds_total") - builds == 1
    assert app.metric("mode_cotd_composite_cache_misses_total") - misses == 1
    assert app.metric("mode_cotd_composite_cache_hits_total") - hits == 15


def test_thirty_two_concurrent_gate_requests_are_batched(app):
    count = app.metric("mode_cotd_gate_batch_size_requests_count")
    total = app.metric("mode_cotd_gate_batch_size_requests_sum")
    singles = app.metric("mode_cotd_gate_batch_size_requests_bucket", {"le": "1.0"})
    up_to_8 = app.metric("mode_cotd_gate_batch_size_requests_bucket", {"le": "8.0"})

    async def thirty_two():
        async with app.aclient() as client:
            return await asyncio.gather(*(
                client.completions.create(model="mode-cotd", prompt=f"Q: what is {i} + {i}?\nA:", max_tokens=2)
                for i in range(32)))

    outs = asyncio.run(thirty_two())
    assert all(o.model_extra["mode_cotd"]["route"] == "gate" for o in outs)
    batches = app.metric("mode_cotd_gate_batch_size_requests_count") - count
    assert app.metric("mode_cotd_gate_batch_size_requests_sum") - total == 32
    assert batches < 32, "every prompt went to the gate alone"
    assert app.metric("mode_cotd_gate_batch_size_requests_bucket", {"le": "1.0"}) - singles < batches
    assert app.metric("mode_cotd_gate_batch_size_requests_bucket", {"le": "8.0"}) - up_to_8 == batches  # max size
    print(f"32 gate requests in {batches:.0f} batches (mean size {32 / batches:.1f})")


BAD_REQUESTS = [
    ("/v1/completions", '{"model": "mode-cotd", "prompt": "hi"', 400, None),
    ("/v1/completions", '{"model": "nope", "prompt": "hi"}', 404, "model_not_found"),
    ("/v1/completions", '{"model": "mode-cotd:alpha", "prompt": "hi", "max_tokens": -5}', 400, None),
    ("/v1/completions", '{"model": "mode-cotd:alpha", "prompt": "hi", "max_tokens": 100000000}', 400,
     "context_length_exceeded"),
    ("/v1/completions", '{"model": "mode-cotd", "prompt": "hi", "mixture": {"omega": 1}}', 400, "invalid_mixture"),
    ("/v1/completions", '{"model": "mode-cotd", "prompt": "hi", "mixture": {"alpha": NaN}}', 400, "invalid_mixture"),
    ("/v1/completions", '{"model": "mode-cotd", "prompt": "hi", "mixture": {"alpha": Infinity}}', 400,
     "invalid_mixture"),
    ("/v1/completions", json.dumps({"model": "mode-cotd:alpha", "prompt": "x" * 1100}), 400,
     "context_length_exceeded"),
    ("/v1/completions", '{"model": "mode-cotd:alpha", "prompt": ""}', 400, None),
    ("/v1/chat/completions", '{"model": "mode-cotd:alpha", "messages": []}', 400, None),
    ("/v1/chat/completions", '{"model": "mode-cotd", "messages": [{"role": "user", "content": ""}]}', 400, None),
]


@pytest.mark.parametrize("path, body, status, code", BAD_REQUESTS)
def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(app, path, body, status, code):
    response = app.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    ok = app.client.completions.create(model="mode-cotd", prompt=PROMPT, max_tokens=2)
    assert ok.model_extra["mode_cotd"]["route"] == "gate"


def test_openai_client_raises_typed_errors(app):
    with pytest.raises(openai.NotFoundError):
        app.client.completions.create(model="mode-cotd:omega", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError):
        app.client.completions.create(model="mode-cotd", prompt=PROMPT, extra_body={"mixture": {"alpha": "x"}})
    assert app.metric("mode_cotd_requests_total", {"status": "404"}) >= 1


def test_startup_time(app):
    print(f"app up (Ray + Serve + vLLM tiny student) in {app.startup_seconds:.1f} s")
    assert app.startup_seconds < STARTUP_TIMEOUT_S


def student_replica_pid() -> int:
    """The student replica's process, under this test's Ray (children of this process only)."""
    import psutil

    found = [p for p in psutil.Process().children(recursive=True)
             if "ServeReplica:mode-cotd-test:student" in " ".join(p.cmdline())]
    assert len(found) == 1, found
    return found[0].pid


def test_zz_kill_9_of_the_student_replica(app):
    """Last in the module (it restarts the student): in-flight requests end with a clean error, later ones
    get 503 + Retry-After while the replica reloads, then succeed; nothing hangs."""
    import os
    import signal

    stream = httpx.stream("POST", f"{app.base}/v1/completions", timeout=60, json={
        "model": app.student_name, "prompt": PROMPT, "max_tokens": 900, "ignore_eos": True, "stream": True})
    with stream as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        killed = time.monotonic()
        os.kill(student_replica_pid(), signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]  # must end, not hang
    assert time.monotonic() - killed < 30
    assert any('"error"' in line for line in rest) and rest[-1] == "data: [DONE]", rest[-3:]
    statuses = []
    while True:
        r = httpx.post(f"{app.base}/v1/completions", timeout=60,
                       json={"model": "mode-cotd:alpha", "prompt": PROMPT, "max_tokens": 2})
        statuses.append(r.status_code)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.headers["retry-after"], (r.status_code, r.text)
        assert time.monotonic() - killed < STARTUP_TIMEOUT_S, "the student did not come back"
        time.sleep(0.5)
    print(f"student back {time.monotonic() - killed:.1f} s after kill -9; answers meanwhile: {set(statuses)}")
