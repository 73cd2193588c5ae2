"""A real Prometheus server scrapes the app's /metrics on 127.0.0.1, and the series come back through its query API.

The app is the ingress's FastAPI app (serving.api.create_app: the same /metrics and ServingMetrics
as under Ray Serve) over the real gate and adapter cache with the fake engine of tests/serving,
served by uvicorn on 127.0.0.1. Prometheus runs with the shipped deploy/prometheus/prometheus.yml,
its app target pointed at that port and a 1 s scrape interval. Every query of the shipped Grafana
dashboard is then run through Prometheus, which must accept it, and the main ones must return data.
Prometheus is Debian's package (scripts/setup_env.sh installs it as root); without it the test skips.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time

import httpx
import openai
import pytest
import uvicorn
import yaml

from serving.api import create_app
from serving.backend import LocalBackend
from serving.components import (
    gate_router,
    load_serving_bundle,
    prompt_renderer,
    resolve_settings,
    route_table,
    student_service,
)
from serving.metrics import ServingMetrics
from serving.settings import CacheSettings, ServeSettings

from .conftest import DEPLOY, FakeEngine, free_port

PROMPT = "Q: Tom has 3 apples and buys 4 more. How many?\nA:"


@pytest.fixture(scope="module")
def app_url(deploy_bundle, tiny_student, tmp_path_factory):
    """The ingress app (fake engine) served by uvicorn on 127.0.0.1; its base URL."""
    settings = resolve_settings(ServeSettings(bundle=str(deploy_bundle), student=str(tiny_student),
                                              cache=CacheSettings(dir=str(tmp_path_factory.mktemp("composites")))))
    bundle = load_serving_bundle(settings)
    engine = FakeEngine()
    engine.started = True
    service = student_service(settings, bundle, engine_factory=lambda rank: engine, round_rank=lambda rank: rank)
    app = create_app(LocalBackend(service, gate_router(settings, bundle)), route_table(settings, bundle),
                     prompt_renderer(settings), settings.api, ServingMetrics())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]


@pytest.fixture(scope="module")
def prometheus(app_url, tmp_path_factory):
    """Prometheus on 127.0.0.1 with the shipped config, scraping the app every second; stopped by its PID."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no `prometheus` on PATH: install Debian's package (`apt-get install prometheus`; "
                    "scripts/setup_env.sh does it when run as root)")
    tmp_path = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["mode-cotd"]["static_configs"] = [{"targets": [app_url.removeprefix("http://")]}]
    jobs["ray"]["file_sd_configs"] = [{"files": [str(tmp_path / "no-ray-nodes.json")]}]  # not another Ray's nodes
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield Prometheus(url)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def send_traffic(app_url: str, n: int = 12) -> None:
    async def many():
        async with openai.AsyncOpenAI(base_url=f"{app_url}/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(
                client.completions.create(model=model, prompt=f"{PROMPT} {i}", max_tokens=8, **extra)
                for i, (model, extra) in enumerate(
                    [("mode-cotd", {}), ("mode-cotd:alpha", {}),
                     ("mode-cotd", {"extra_body": {"mixture": {"alpha": 0.5, "beta": 0.5}}})] * (n // 3))))

    outs = asyncio.run(many())
    assert all(o.model_extra["mode_cotd"]["route"] for o in outs)


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "mode-cotd-dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_prometheus_scrapes_the_app_and_answers_mode_cotd_queries(app_url, prometheus):
    send_traffic(app_url)
    started = time.monotonic()
    while True:  # the next scrapes pick the requests up
        result = prometheus.query('sum(mode_cotd_requests_total{endpoint="/v1/completions", status="200"})')
        if result and float(result[0]["value"][1]) >= 12:  # (or more: the other test may have run first)
            break
        assert time.monotonic() - started < 30, f"no mode_cotd_requests_total in Prometheus: {result}"
        time.sleep(0.5)
    print(f"Prometheus had mode_cotd_requests_total = {result[0]['value'][1]} {time.monotonic() - started:.1f} s "
          "after the requests")

    targets = httpx.get(f"{prometheus.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    app_targets = [t for t in targets if t["labels"]["job"] == "mode-cotd"]
    assert [t["health"] for t in app_targets] == ["up"], app_targets

    routes = {r["metric"]["route"] for r in prometheus.query("mode_cotd_requests_total")}
    assert {"gate", "expert", "mixture"} <= routes
    assert prometheus.query("mode_cotd_time_to_first_token_seconds_count")
    assert prometheus.query("mode_cotd_composite_builds_total")
    assert {r["metric"]["expert"] for r in prometheus.query("mode_cotd_routed_weight_ratio_count")}


def test_every_dashboard_query_runs_in_prometheus(app_url, prometheus):
    send_traffic(app_url)
    started = time.monotonic()
    while not prometheus.query("rate(mode_cotd_requests_total[1m])"):  # rate() needs two scrapes
        assert time.monotonic() - started < 30, "Prometheus never scraped the app twice"
        time.sleep(0.5)
    send_traffic(app_url)
    time.sleep(1.5)
    empty = []
    for expr in dashboard_queries():
        result = prometheus.query(expr.replace("$__rate_interval", "1m"))  # Grafana fills in the interval
        if not result:
            empty.append(expr)
    # The series the traffic above must have produced (failures, fallbacks, disconnects, SVD: none happened).
    for wanted in ("mode_cotd_requests_total", "mode_cotd_e2e_latency_seconds_bucket",
                   "mode_cotd_output_tokens_total", "mode_cotd_gate_batch_size_requests_sum"):
        assert not [e for e in empty if wanted in e], (wanted, empty)

