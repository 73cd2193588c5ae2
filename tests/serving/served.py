"""The app over the plain classes in one process (LocalBackend, real gate and adapter cache, a fake engine).

Shared by the HTTP tests: `Served(...)` builds the FastAPI app exactly as the ingress does,
with a TestClient; `completion` posts one request; `assert_openai_error` checks the error shape.
"""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from serving.api import create_app
from serving.backend import LocalBackend
from serving.components import (
    composition_jobs,
    gate_router,
    ingress_routes,
    load_serving_bundle,
    prompt_renderer,
    resolve_settings,
    student_service,
)
from serving.metrics import ServingMetrics
from serving.settings import ApiSettings, CacheSettings, EngineSettings, RuntimeSettings, ServeSettings

from .conftest import FakeEngine

PROMPT = "Infer the correct answer for the question.\n\nQ: What is 2 + 3?\nA:"


class Served:
    def __init__(self, tiny_bundle, tiny_student, tmp_path, api: ApiSettings | None = None,
                 engine: FakeEngine | None = None, engine_settings: EngineSettings | None = None,
                 runtime: RuntimeSettings | None = None):
        settings = resolve_settings(ServeSettings(
            bundle=str(tiny_bundle), student=str(tiny_student), api=api or ApiSettings(),
            cache=CacheSettings(dir=str(tmp_path / "composites")),
            engine=engine_settings or EngineSettings(mixture_union=False),  # composites; tests/serving/test_union_serving.py covers the union
            runtime=runtime or RuntimeSettings(),
        ))
        bundle = load_serving_bundle(settings)
        self.engine = engine or FakeEngine()
        self.service = student_service(settings, bundle, engine_factory=lambda rank: self.engine,
                                       round_rank=lambda rank: rank)
        self.metrics = ServingMetrics()
        self.routes = ingress_routes(settings, bundle)
        self.prompts = prompt_renderer(settings)
        self.router = gate_router(settings, bundle)
        self.backend = LocalBackend(self.service, self.router)
        self.settings = settings
        self.jobs = composition_jobs(settings, bundle, self.routes, self.backend, self.prompts)
        self.app = create_app(self.backend, self.routes, self.prompts, settings.api, self.metrics, self.jobs)
        self.client = TestClient(self.app, raise_server_exceptions=False)
        self.student_name = self.routes.student_name
        self.auth_headers: dict[str, str] = {}
        """Headers `sample` sends to /metrics (an API key when the test configured keys)."""

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        text = self.client.get("/metrics", headers=self.auth_headers).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += s.value
        return total


def completion(served: Served, **body):
    return served.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, **body})


def assert_openai_error(response, status: int, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if status in (429, 503):
        assert int(response.headers["retry-after"]) >= 0
    return error


def built(cache) -> list[str]:
    """What the adapter cache wrote (composites, leftovers), the union's placeholder adapter aside."""
    from serving.mixture_union import PLACEHOLDER

    return [p.name for p in cache.cache_dir.iterdir() if p.name != PLACEHOLDER]
