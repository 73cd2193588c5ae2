"""Runtime routes on the real stack: Ray Serve + vLLM (tiny student, two student replicas) on 127.0.0.1.

In order, on one app: load an expert through vLLM's endpoint and get completions from it and from a mixture
that uses it (the official openai client), unload it, load it again; compose a task from five examples
through /v1/compositions and get a completion from the new route; kill -9 one student replica and see the
replacement serve the runtime expert; restart the app and find both routes back.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mode_cotd.adapter import save_adapter
from mode_cotd.tiny import random_adapter
from serving.settings import (
    CacheSettings,
    DeploymentSettings,
    EngineSettings,
    RuntimeSettings,
    ServeSettings,
)

from .serve_app import free_port
from .test_serve_integration import PROMPT

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.ray]

STARTUP_TIMEOUT_S = 480
EXAMPLES = [{"prompt": f"Q: Tom has {i} apples and buys 2 more. How many?",
             "answer": f"Tom has {i} and buys 2, so {i} + 2 = {i + 2}.\n\n-->\n\n{i + 2}"} for i in range(1, 6)]


@pytest.fixture(scope="module")
def app(tiny_bundle, tiny_student, tmp_path_factory, heavy_lock_for_module):
    import ray
    from ray import serve

    from serving.app import build_app

    tmp = tmp_path_factory.mktemp("runtime")
    loras = tmp / "loras"
    save_adapter(random_adapter(tiny_student, r=8, lora_alpha=16.0, seed=21, std=0.3), loras / "delta")
    port = free_port()
    settings = ServeSettings(
        bundle=str(tiny_bundle), student=str(tiny_student), host="127.0.0.1", port=port, app_name="mode-cotd-rt",
        student_deployment=DeploymentSettings(num_replicas=2, num_cpus=0.5),
        engine=EngineSettings(max_model_len=512, max_loras=4, max_cpu_loras=8, max_num_seqs=16, enforce_eager=True,
                              kv_cache_memory_bytes=32 * 2**20, cpu_threads_bind="nobind"),
        cache=CacheSettings(dir=str(tmp / "composites")),
        runtime=RuntimeSettings(enabled=True, state_dir=str(tmp / "state"), adapter_roots=[str(loras)],
                                search_budget=12),
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    base = f"http://127.0.0.1:{port}"

    def start() -> None:
        serve.run(build_app(settings), name=settings.app_name, route_prefix="/", blocking=False)
        started = time.monotonic()
        while not _up(base):
            assert time.monotonic() - started < STARTUP_TIMEOUT_S, "the app did not start"
            time.sleep(1)

    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        start()
        yield {"base": base, "loras": loras, "restart": lambda: (serve.delete(settings.app_name), start())}
    finally:
        serve.shutdown()
        ray.shutdown()


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app['base']}/v1", api_key="none", max_retries=0, timeout=120)


def post(app, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{app['base']}{path}", json=body, timeout=120)


def complete(app, model: str, **extra) -> openai.types.Completion:
    return client(app).completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, **extra)


def replicas_seen(app) -> set[str]:
    text = httpx.get(f"{app['base']}/metrics", timeout=30).text
    return {s.labels["replica"] for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "mode_cotd_lora_slots_in_use_adapters"}


def served_by_delta(completion) -> bool:
    """Served by the runtime expert: from its own folder (loaded after the replica started), or as a member of the
    union (a replica that started after it was loaded pins it with the bundle's experts)."""
    adapter = completion.model_extra["mode_cotd"]["adapter"]
    return adapter.startswith("runtime-delta-") or adapter == "expert-delta"


def test_1_load_serve_mix_unload(app):
    loaded = post(app, "/v1/load_lora_adapter", {"lora_name": "delta", "lora_path": str(app["loras"] / "delta")})
    assert loaded.status_code == 200 and "added successfully" in loaded.text, loaded.text
    one = complete(app, "mode-cotd:delta")
    assert one.model_extra["mode_cotd"]["adapter"].startswith("runtime-delta-")
    mixed = complete(app, "mode-cotd", extra_body={"mixture": {"alpha": 0.5, "delta": 0.5}})
    assert mixed.model_extra["mode_cotd"]["experts"] == {"alpha": 0.5, "delta": 0.5}
    assert post(app, "/v1/unload_lora_adapter", {"lora_name": "delta"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(app, "mode-cotd:delta")
    again = post(app, "/v1/load_lora_adapter", {"lora_name": "delta", "lora_path": str(app["loras"] / "delta")})
    assert again.status_code == 200
    assert complete(app, "mode-cotd:delta").choices[0].text is not None


def test_2_compose_a_task_from_five_examples(app):
    started = post(app, "/v1/compositions", {"name": "add_two", "examples": EXAMPLES})
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    deadline = time.monotonic() + 300
    while (job := httpx.get(f"{app['base']}/v1/compositions/{job_id}", timeout=30).json())["status"] not in (
            "succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    assert job["status"] == "succeeded", job
    print(f"composition job: {job['progress']['evaluations']} evaluations in {job['result']['seconds']:.1f} s")
    answer = complete(app, "mode-cotd:add_two")
    assert answer.model_extra["mode_cotd"]["experts"] == job["result"]["weights"]
    assert "mode-cotd:add_two" in {m.id for m in client(app).models.list()}


def test_3_a_replacement_replica_serves_the_runtime_expert(app):
    import psutil

    before = replicas_seen(app)
    students = [p for p in psutil.Process().children(recursive=True)
                if "ServeReplica:mode-cotd-rt:student" in " ".join(p.cmdline())]
    assert len(students) == 2, students
    os.kill(students[0].pid, signal.SIGKILL)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not (replicas_seen(app) - before):  # a replica id that served nothing before the kill
        assert time.monotonic() < deadline, "no replacement replica served the runtime expert"
        try:
            assert served_by_delta(complete(app, "mode-cotd:delta"))
        except (openai.InternalServerError, openai.APIStatusError) as e:  # 503 while the replica restarts
            assert getattr(e, "status_code", 503) == 503, e
            time.sleep(1)


def test_4_both_routes_come_back_after_a_restart(app):
    app["restart"]()
    models = {m.id for m in client(app).models.list()}
    assert {"mode-cotd:delta", "mode-cotd:add_two"} <= models
    assert complete(app, "mode-cotd:delta").model_extra["mode_cotd"]["adapter"] == "expert-delta"  # joined the union
    assert complete(app, "mode-cotd:add_two").model_extra["mode_cotd"]["route"] == "composition"
