"""The colocated layout through Ray Serve on 127.0.0.1: one deployment holds the API, the gate and vLLM.

Started once for the module (tiny student, 3 tiny experts, a gate), checked with the official openai client: the
app has one deployment; and the split layout's own tests, imported here so they run against this app: every route
answers completions, chats and streams (streamed text equals the whole answer), and 32 concurrent gate requests
reach the in-process gate in batches of at most 8.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .serve_app import serve_app
from .test_serve_integration import (  # noqa: F401 - the imported tests run against this module's app
    PROMPT,
    App,
    test_completion_chat_and_stream_per_route,
    test_thirty_two_concurrent_gate_requests_are_batched,
    tiny_app_settings,
)

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.ray]


@pytest.fixture(scope="module")
def app(tiny_bundle, tiny_student, tmp_path_factory, heavy_lock_for_module):
    settings = tiny_app_settings(tiny_bundle, tiny_student, tmp_path_factory.mktemp("composites"),
                                 "mode-cotd-colocated-test", layout="colocated")
    with serve_app(settings) as (base, startup_s):
        yield App(base, Path(tiny_student).name, startup_s)


def test_one_deployment_holds_the_app(app):
    from ray import serve

    assert sorted(serve.status().applications["mode-cotd-colocated-test"].deployments) == ["colocated"]


def test_metrics_read_the_students_counts(app):
    app.client.completions.create(model="mode-cotd:alpha", prompt=PROMPT, max_tokens=4, temperature=0)
    assert app.metric("mode_cotd_requests_total") > 0 and app.metric("mode_cotd_lora_slots_in_use_adapters") > 0
    assert app.metric("mode_cotd_engine_unfinished_requests") == 0
