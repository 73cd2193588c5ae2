"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis + hypothesis), and count what came back.

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)      # in process
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")      # a running server
    report = fuzz(schema, {"POST /v1/completions": 300, ...}, base_url=...)

Every operation is fuzzed with valid bodies (positive) and with bodies that break the
schema (negative: wrong types, missing fields, out-of-range numbers). A random `model`
is nearly always unknown (404 before any work), so in two cases of three the body's
`model` is swapped for one the server serves, and the rest of the body goes deeper. A case is
*unexpected* when the answer is a 5xx other than 503, a 429/503 without `Retry-After`, an
error that is not OpenAI's error JSON, or a success that is not a completion; a *crash*
is a call that raised (connection refused or reset, timeout, an exception out of the app).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class FuzzReport:
    cases: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_operation: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    slowest_s: float = 0.0

    @property
    def server_errors(self) -> int:
        """Responses with a 5xx status other than 503."""
        return sum(n for status, n in self.by_status.items() if status >= 500 and status != 503)

    def as_dict(self) -> dict:
        return {"cases": self.cases, "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                "by_operation": dict(self.by_operation), "unexpected_5xx": self.server_errors,
                "unexpected": self.unexpected[:20], "crashes": len(self.crashes), "crash_samples": self.crashes[:20],
                "seconds": round(self.seconds, 1), "slowest_case_s": round(self.slowest_s, 2)}


def problem(status: int, headers, text: str, path: str) -> str | None:
    """Why this answer is unexpected, or None."""
    if status >= 500 and status != 503:
        return f"status {status}"
    if status in (429, 503) and "retry-after" not in {k.lower() for k in headers}:
        return f"{status} without Retry-After"
    if status >= 400:
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            return f"{status} body is not OpenAI error JSON: {text[:120]!r}"
        if set(error) != ERROR_KEYS or not error["message"]:
            return f"{status} error object has keys {sorted(error)}"
        return None
    if path in ("/v1/completions", "/v1/chat/completions"):
        if text.startswith("data: "):  # the client may stop reading early (schemathesis caps stream events)
            for line in text.splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    try:
                        json.loads(line[len("data: "):])
                    except ValueError:
                        return f"stream event is not JSON: {line[:120]!r}"
            return None
        try:
            body = json.loads(text)
        except ValueError:
            return f"200 body is not JSON: {text[:120]!r}"
        if "mode_cotd" not in body or "choices" not in body:
            return "200 body is not a completion with mode_cotd"
    return None


def fuzz(schema, cases: dict[str, int], models: list[str], base_url: str | None = None, timeout_s: float = 120.0,
         seed_value: int = 0) -> FuzzReport:
    """Up to `cases["METHOD /path"]` cases per operation (half positive, half negative); the report."""
    report = FuzzReport()
    started = time.perf_counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        name = f"{operation.method.upper()} {operation.path}"
        budget = cases.get(name, 0)
        for mode, share in ((GenerationMode.POSITIVE, (budget + 1) // 2), (GenerationMode.NEGATIVE, budget // 2)):
            if share <= 0:
                continue
            _run(operation, mode, share, report, name, models, base_url, timeout_s, seed_value)
    report.seconds = time.perf_counter() - started
    return report


def _run(operation, mode, examples: int, report: FuzzReport, name: str, models: list[str], base_url: str | None,
         timeout_s: float, seed_value: int) -> None:
    kwargs = {"base_url": base_url, "timeout": timeout_s} if base_url else {}

    @seed(seed_value)
    @settings(max_examples=examples, database=None, deadline=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate])
    @given(case=operation.as_strategy(generation_mode=mode),
           model=st.sampled_from([None, *models, *models]) if models else st.none())
    def one(case, model) -> None:
        if model is not None and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = model
        report.cases += 1
        report.by_operation[name] += 1
        began = time.perf_counter()
        try:
            response = case.call(**kwargs)
        except Exception as e:  # noqa: BLE001 - any exception out of a call is a crash to count
            report.crashes.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
            return
        finally:
            report.slowest_s = max(report.slowest_s, time.perf_counter() - began)
        report.by_status[response.status_code] += 1
        why = problem(response.status_code, response.headers, response.text, operation.path)
        if why:
            report.unexpected.append(f"{name} [{mode.value}]: {why}; body {str(case.body)[:200]}")

    try:
        one()
    except Unsatisfiable:  # no invalid input exists for an operation without parameters (GET /health)
        pass
