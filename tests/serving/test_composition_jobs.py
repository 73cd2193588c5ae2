"""Composition jobs through the app (plain classes): a job searches over the bundle's experts with the engine's
prompt logprobs, reports progress, and leaves a route; bad jobs get a 4xx naming the field."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from serving.protocol import AdapterReport, GenerationDelta, GenerationStarted, TokenLogprob
from serving.settings import RuntimeSettings

from .served import Served, assert_openai_error, completion

TARGET = {"alpha": 0.7, "beta": 0.3, "gamma": 0.0}
EXAMPLES = [{"prompt": f"Q: What is {i} + 1?", "answer": f"{i} plus one.\n\n-->\n\n{i + 1}"} for i in range(5)]


class ScoringBackend:
    """Scores every token at -d, d the squared distance of the request's mixture to TARGET: each forced token as
    it is emitted (one delta per token, as vLLM streams them), else every prompt token."""

    def __init__(self, inner):
        self.inner = inner
        self.scored: list[dict[str, float]] = []
        self.modes: list[str] = []
        self.requests = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, request):
        weights = request.adapter.mixture.as_dict()
        self.scored.append(weights)
        self.modes.append(request.adapter.mode)
        self.requests.append(request)
        distance = sum((weights.get(e, 0.0) - t) ** 2 for e, t in TARGET.items())
        yield GenerationStarted(AdapterReport())
        if request.sampling.forced_tokens:
            for _ in request.sampling.forced_tokens:
                yield GenerationDelta(0, "t", 1, logprobs=[TokenLogprob("t", -distance)])
            return
        logprobs = [TokenLogprob("t", None, None)] + [TokenLogprob("t", -distance) for _ in request.prompt_token_ids[1:]]
        yield GenerationDelta(0, "x", 1, finish_reason="length", prompt_logprobs=logprobs)


@pytest.fixture
def served(tiny_bundle, tiny_student, tmp_path):
    runtime = RuntimeSettings(enabled=True, state_dir=str(tmp_path / "state"), search_budget=30, max_examples=8)
    s = Served(tiny_bundle, tiny_student, tmp_path, runtime=runtime)
    s.engine.started = True
    s.jobs.backend = ScoringBackend(s.backend)
    return s


def wait(client, job_id: str, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        document = client.get(f"/v1/compositions/{job_id}").json()
        if document["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return document
        time.sleep(0.05)


def test_a_job_finds_the_mixture_the_scores_favour_and_serves_it(served):
    with TestClient(served.app, raise_server_exceptions=False) as client:  # one event loop for the job
        response = client.post("/v1/compositions", json={"name": "plus_one", "examples": EXAMPLES})
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["status"] == "queued" and job["model"] == "mode-cotd:plus_one"
        done = wait(client, job["id"])
        assert done["status"] == "succeeded", done
        assert done["progress"]["evaluations"] == 30 and len(done["result"]["trace"]) == 30
        weights = done["result"]["weights"]
        assert all(w >= 0 for w in weights.values()) and abs(sum(weights.values()) - 1) < 1e-9
        found = sum((weights.get(e, 0.0) - t) ** 2 for e, t in TARGET.items())
        assert done["result"]["loss"] == pytest.approx(found) == min(t["loss"] for t in done["result"]["trace"])
        scored = {tuple(sorted(w.items())) for w in served.jobs.backend.scored}
        assert len(scored) >= 3  # the search moved (on the tiny gate's coarse grid of 1/4: mode_cotd.weight_search
        # has the test that it finds better mixtures over ten experts on the grid 1/20)
        assert all(set(w) <= set(TARGET) for w in served.jobs.backend.scored)  # only the bundle's experts
        assert set(served.jobs.backend.modes) == {"exact"}

        served_route = completion(served, model="mode-cotd:plus_one")
        assert served_route.status_code == 200, served_route.text
        assert served_route.json()["mode_cotd"]["experts"] == weights
        listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert "mode-cotd:plus_one" in listed


def test_a_linear_job_scores_linear_candidates_and_leaves_a_linear_route(served):
    with TestClient(served.app, raise_server_exceptions=False) as client:
        job = client.post("/v1/compositions", json={"name": "plus_one", "examples": EXAMPLES, "mode": "linear"}).json()
        assert job["mode"] == "linear"
        done = wait(client, job["id"])
        assert done["status"] == "succeeded", done
    assert set(served.jobs.backend.modes) == {"linear"}
    assert served.jobs.routes.state.snapshot().compositions["plus_one"].mode == "linear"
    assert completion(served, model="mode-cotd:plus_one").status_code == 200


def test_the_route_survives_a_restart(served, tiny_bundle, tiny_student, tmp_path):
    with TestClient(served.app, raise_server_exceptions=False) as client:
        job = client.post("/v1/compositions", json={"name": "plus_one", "examples": EXAMPLES}).json()
        assert wait(client, job["id"])["status"] == "succeeded"
    again = Served(tiny_bundle, tiny_student, tmp_path, runtime=served.settings.runtime)
    again.engine.started = True
    assert completion(again, model="mode-cotd:plus_one").status_code == 200
    assert again.client.get(f"/v1/compositions/{job['id']}").json()["status"] == "succeeded"


@pytest.mark.parametrize("body, status, param", [
    ({"name": "alpha", "examples": EXAMPLES}, 409, "name"),
    ({"name": "../x", "examples": EXAMPLES}, 400, "name"),
    ({"name": "new", "examples": []}, 400, "examples"),
    ({"name": "new", "examples": EXAMPLES * 2}, 400, "examples"),
    ({"name": "new", "examples": [{"prompt": "Q", "answer": "x" * 9000}]}, 400, "examples"),
    ({"name": "new", "examples": [{"prompt": " ", "answer": "1"}]}, 400, "examples"),
    ({"name": "new", "examples": EXAMPLES, "objective": "vibes"}, 400, "objective"),
    ({"name": "new", "examples": EXAMPLES, "priority": "urgent"}, 400, "priority"),
    ({"name": "new", "examples": EXAMPLES, "mode": "svd"}, 400, "mode"),
    ({"name": "new", "examples": [{"prompt": "Q"}]}, 400, None),
])
def test_bad_jobs_are_refused_and_the_server_keeps_serving(served, body, status, param):
    error = assert_openai_error(served.client.post("/v1/compositions", json=body), status)
    if param is not None:
        assert error["param"] == param, error
    assert completion(served, model="mode-cotd:alpha").status_code == 200


def test_a_taken_name_a_second_job_and_an_unknown_job(served):
    with TestClient(served.app, raise_server_exceptions=False) as client:
        first = client.post("/v1/compositions", json={"name": "plus_one", "examples": EXAMPLES})
        assert first.status_code == 202
        again = client.post("/v1/compositions", json={"name": "plus_one", "examples": EXAMPLES})
        assert_openai_error(again, 409 if again.status_code == 409 else 429)
        other = client.post("/v1/compositions", json={"name": "other", "examples": EXAMPLES})
        if other.status_code != 202:  # runtime.max_jobs = 1 while the first runs
            assert_openai_error(other, 429)
        wait(client, first.json()["id"])
        assert_openai_error(client.get("/v1/compositions/compose-0000000000000000"), 404)


def test_a_background_request_waits_for_an_idle_engine(served):
    """Scoring of a job (background) starts only once the engine holds no other request."""
    import asyncio

    from mode_cotd.mixture import Mixture
    from serving.protocol import AdapterSpec, GenerationRequest, SamplingSettings

    busy = {"depth": 1}
    served.engine.queue_depth = lambda: busy["depth"]

    async def scenario():
        request = GenerationRequest("bg", [1, 2, 3], SamplingSettings(max_tokens=2), AdapterSpec(Mixture.one("alpha")),
                                    background=True)
        task = asyncio.ensure_future(anext(aiter(served.service.generate(request))))
        await asyncio.sleep(0.1)
        waited = not task.done() and not served.engine.requests
        busy["depth"] = 0
        started = await asyncio.wait_for(task, 2)
        return waited, started

    waited, started = asyncio.run(scenario())
    assert waited and started.adapter.lora_name == "expert-alpha"


def test_answer_tokens_are_scored_by_forced_decoding_and_a_long_answer_by_prompt_logprobs(served):
    """answer_loss: the request is the example up to its answer and forces exactly the answer's tokens (in the
    background by default); few_shot_loss over a long answer: the whole example, with prompt logprobs."""
    from mode_cotd.shots import shot_from_text, shot_pairs

    served.jobs.settings.search_budget = 2
    long_answer = " ".join(["step"] * 40) + "\n\n-->\n\n7"
    backend = served.jobs.backend
    with TestClient(served.app, raise_server_exceptions=False) as client:
        job = client.post("/v1/compositions", json={"name": "short", "examples": EXAMPLES[:3]}).json()
        assert wait(client, job["id"])["status"] == "succeeded"
        forced, backend.requests[:] = list(backend.requests), []
        body = {"name": "long", "examples": [{"prompt": "Q: 3 + 4?", "answer": long_answer}],
                "objective": "few_shot_loss"}
        job = client.post("/v1/compositions", json=body).json()
        assert wait(client, job["id"])["status"] == "succeeded"
        scored_by_prompt = list(backend.requests)
    tokenizer = served.jobs.tokenizer
    for request in forced:
        example = EXAMPLES[int(tokenizer.decode(request.prompt_token_ids).split("What is ")[1][0])]
        (ids, labels), = shot_pairs(tokenizer, [shot_from_text(example["prompt"], example["answer"])],
                                    served.jobs.max_model_len - 1, answer_only=True)
        answer = [i for i, label in zip(ids, labels) if label != -100]
        assert list(request.sampling.forced_tokens) == answer and request.sampling.max_tokens == len(answer)
        assert request.prompt_token_ids + answer == ids and request.sampling.logprobs == 0
        assert request.sampling.prompt_logprobs is None
    assert all(r.background for r in forced)
    assert scored_by_prompt and all(r.sampling.prompt_logprobs == 0 and not r.sampling.forced_tokens
                                    for r in scored_by_prompt)


def test_bad_runtime_settings_stop_the_server_at_start(tiny_bundle, tiny_student, tmp_path):
    from mode_cotd.errors import ConfigError

    with pytest.raises(ConfigError, match="job_priority"):
        Served(tiny_bundle, tiny_student, tmp_path,
               runtime=RuntimeSettings(enabled=True, state_dir=str(tmp_path / "s"), job_priority="urgent"))


def test_a_slow_job_keeps_its_heartbeat_and_ends_succeeded(served, monkeypatch):
    import asyncio

    from serving import composition_jobs

    monkeypatch.setattr(composition_jobs, "HEARTBEAT_S", 0.02)
    fast = served.jobs.backend

    class Slow:
        async def generate(self, request):
            await asyncio.sleep(0.1)  # each example waits, as behind a busy engine
            async for event in fast.generate(request):
                yield event

    served.jobs.backend = Slow()
    served.jobs.settings.search_budget = 3
    with TestClient(served.app, raise_server_exceptions=False) as client:
        job = client.post("/v1/compositions", json={"name": "slow", "examples": EXAMPLES[:2]}).json()
        time.sleep(0.15)
        first = client.get(f"/v1/compositions/{job['id']}").json()
        time.sleep(0.1)
        second = client.get(f"/v1/compositions/{job['id']}").json()
        assert first["status"] == "running" and second["updated"] > first["updated"]
        done = wait(client, job["id"])
        time.sleep(0.1)  # a heartbeat still in flight must not turn it back to running
        assert done["status"] == client.get(f"/v1/compositions/{job['id']}").json()["status"] == "succeeded"
