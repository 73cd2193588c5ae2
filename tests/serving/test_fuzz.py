"""Schemathesis fuzzing of the whole HTTP API (its own OpenAPI schema) over the app with a fake engine.

CI runs ~150 cases; the >= 1,000-case run is marked manual and writes its counts to JSON
(docs/reliability.md records them). The run against the real server is in
tests/reliability/test_real_server.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import schemathesis

from .fuzzing import fuzz

CI_CASES = {"POST /v1/completions": 70, "POST /v1/chat/completions": 60, "GET /v1/models": 6,
            "GET /health": 2, "GET /metrics": 2}
MANUAL_CASES = {"POST /v1/completions": 560, "POST /v1/chat/completions": 520, "GET /v1/models": 20,
                "GET /health": 10, "GET /metrics": 10}


def run_fuzz(served, cases: dict[str, int], seed_value: int):
    schema = schemathesis.openapi.from_asgi("/openapi.json", served.app)
    models = [m["id"] for m in served.client.get("/v1/models").json()["data"]]
    report = fuzz(schema, cases, models, seed_value=seed_value)
    assert served.client.get("/health").status_code == 200  # still serving
    assert served.service.open == 0 and served.service.cache._users == {}  # nothing leaked
    assert served.sample("mode_cotd_queue_depth_requests", {"stage": "ingress"}) == 0
    return report


def test_fuzz_the_api_from_its_schema(served):
    report = run_fuzz(served, CI_CASES, seed_value=7)
    print(json.dumps(report.as_dict(), indent=1))
    assert report.cases >= 100
    assert not report.crashes, report.crashes[:5]
    assert not report.unexpected, report.unexpected[:5]
    assert report.by_status[200] > 10 and any(400 <= s < 500 for s in report.by_status)


@pytest.mark.manual
def test_fuzz_a_thousand_cases(served):
    report = run_fuzz(served, MANUAL_CASES, seed_value=int(os.environ.get("MODE_COTD_FUZZ_SEED", "1")))
    out = Path(os.environ.get("MODE_COTD_FUZZ_REPORT", "/tmp/mode-cotd-fuzz-inprocess.json"))
    out.write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    print(json.dumps(report.as_dict(), indent=1))
    assert report.cases >= 1000
    assert not report.crashes, report.crashes[:5]
    assert not report.unexpected, report.unexpected[:5]
