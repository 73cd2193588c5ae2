"""Security: optional API keys (constant time, never from the command line), no state-changing endpoints,
paths confined to the bundle and cache, no pickle anywhere, 127.0.0.1 by default, prompt-free request logs."""

from __future__ import annotations

import hmac
import logging
import re
from pathlib import Path

import pytest

from mode_cotd import paths
from mode_cotd.errors import ConfigError
from serving.adapter_cache import AdapterCache
from serving.auth import KeyChecker, load_api_keys
from serving.cli import build_parser
from serving.settings import ApiSettings, ServeSettings

from .conftest import FakeEngine
from .served import PROMPT, Served, assert_openai_error, built, completion

KEY = "sk-test-0123456789"


# ---------------------------------------------------------------------------- API keys


def test_no_keys_means_no_auth(served):
    assert completion(served, model="mode-cotd:alpha").status_code == 200


def test_keys_from_the_environment(tiny_bundle, tiny_student, tmp_path, monkeypatch):
    monkeypatch.setenv("MODE_COTD_API_KEYS", f"{KEY}, sk-other-key-xyz")
    s = Served(tiny_bundle, tiny_student, tmp_path)
    s.engine.started = True
    body = {"model": "mode-cotd:alpha", "prompt": PROMPT, "max_tokens": 4}
    response = s.client.post("/v1/completions", json=body)
    assert_openai_error(response, 401, "invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"
    for bad in ("Bearer sk-test-012345678", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer ", KEY):
        assert_openai_error(s.client.post("/v1/completions", json=body, headers={"Authorization": bad}), 401)
    for good in (KEY, "sk-other-key-xyz"):
        ok = s.client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {good}"})
        assert ok.status_code == 200
    assert s.client.get("/health").status_code == 200  # load balancers need no key
    for path in ("/v1/models", "/metrics", "/openapi.json"):
        assert s.client.get(path).status_code == 401
        assert s.client.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    s.auth_headers = {"Authorization": f"Bearer {KEY}"}
    assert s.sample("mode_cotd_requests_total", {"status": "401"}) == 7  # the /v1 ones: 1 + 5 + /v1/models


def test_unauthenticated_bodies_are_never_read(tiny_bundle, tiny_student, tmp_path, monkeypatch):
    monkeypatch.setenv("MODE_COTD_API_KEYS", KEY)
    s = Served(tiny_bundle, tiny_student, tmp_path, api=ApiSettings(max_body_bytes=100))
    response = s.client.post("/v1/completions", content=b"x" * 1000, headers={"content-type": "application/json"})
    assert_openai_error(response, 401)  # not 413: auth comes before the body


def test_keys_from_a_file(tiny_bundle, tiny_student, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# service accounts\n{KEY}\n\n")
    s = Served(tiny_bundle, tiny_student, tmp_path, api=ApiSettings(api_keys_file=str(keys)))
    s.engine.started = True
    assert completion(s, model="mode-cotd:alpha").status_code == 401
    ok = s.client.post("/v1/completions", json={"model": "mode-cotd:alpha", "prompt": PROMPT, "max_tokens": 2},
                       headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


def test_a_configured_key_file_that_is_missing_or_empty_stops_the_server(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_api_keys(ApiSettings(api_keys_file=str(tmp_path / "nope")))
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no keys"):
        load_api_keys(ApiSettings(api_keys_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="at least 8"):
        KeyChecker(["short"])
    assert load_api_keys(ApiSettings(), environ={}) == []
    assert load_api_keys(ApiSettings(api_keys_env="MY_KEYS"), environ={"MY_KEYS": "a1234567,b1234567"}) == [
        "a1234567", "b1234567"]


def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    checker = KeyChecker([KEY, "sk-second-key", "sk-third-key"])
    assert checker.accepts(KEY) and not checker.accepts("sk-nope-nope") and not checker.accepts(None)
    assert len(calls) == 9  # all three keys every time, even after a match
    assert {c for c in calls} == {(32, 32)}  # digests: equal lengths, nothing learned from the length


def test_no_flag_takes_a_key_on_the_command_line():
    flags = [a for action in build_parser()._actions for a in action.option_strings]
    key_flags = [f for f in flags if "key" in f]
    assert sorted(key_flags) == ["--api-api-keys-env", "--api-api-keys-file"]


# ---------------------------------------------------------------------------- surface and defaults


def test_no_endpoint_changes_server_state(served):
    """By default the only POSTs are the two inference endpoints; the state-changing ones exist only with runtime
    routes on (runtime.enabled, serving/runtime_api.py), behind the API keys (the test below)."""
    routes = {(method, r.path) for r in served.app.routes for method in getattr(r, "methods", None) or ()}
    assert {r for r in routes if r[0] not in ("GET", "HEAD")} == {
        ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")}


def test_runtime_endpoints_are_behind_the_api_keys(tiny_bundle, tiny_student, tmp_path, monkeypatch):
    from serving.runtime_api import RUNTIME_POSTS
    from serving.settings import RuntimeSettings

    monkeypatch.setenv("MODE_COTD_API_KEYS", KEY)
    s = Served(tiny_bundle, tiny_student, tmp_path,
               runtime=RuntimeSettings(enabled=True, state_dir=str(tmp_path / "state"), adapter_roots=[str(tmp_path)]))
    routes = {(method, r.path) for r in s.app.routes for method in getattr(r, "methods", None) or ()}
    posts = {path for method, path in routes if method == "POST"}
    assert posts == {"/v1/completions", "/v1/chat/completions", *RUNTIME_POSTS}
    for path in RUNTIME_POSTS:
        assert_openai_error(s.client.post(path, json={"lora_name": "x", "lora_path": str(tmp_path)}), 401)
    assert_openai_error(s.client.get("/v1/compositions/compose-0"), 401)
    assert not (tmp_path / "state").exists()


def test_the_server_binds_localhost_by_default():
    assert ServeSettings().host == "127.0.0.1"
    assert build_parser().parse_args([]).__dict__.get("host", "127.0.0.1") == "127.0.0.1"


def test_request_logs_leave_out_prompt_text_unless_asked(tiny_bundle, tiny_student, tmp_path, caplog):
    secret = "my card number is 4111 1111 1111 1111"
    for log_prompts in (False, True):
        s = Served(tiny_bundle, tiny_student, tmp_path, api=ApiSettings(log_prompts=log_prompts))
        s.engine.started = True
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            completion(s, model="mode-cotd:alpha", prompt=secret)
            completion(s, model="mode-cotd:alpha", prompt=secret, stream=True)
            completion(s, model="mode-cotd:alpha", prompt=secret, max_tokens=10**9)  # an error
            s.client.post("/v1/chat/completions", json={"model": "mode-cotd:alpha",
                                                        "messages": [{"role": "wizard", "content": secret}]})
        request_lines = [r.getMessage() for r in caplog.records if r.name == "mode_cotd.requests"]
        assert len(request_lines) == 2 and all("status=200" in line for line in request_lines)
        assert any(secret in r.getMessage() for r in caplog.records) == log_prompts


# ---------------------------------------------------------------------------- paths


@pytest.mark.parametrize("model", ["../alpha", "/etc/passwd", "mode-cotd:../alpha", "mode-cotd:/tmp/x",
                                   "mode-cotd:composition:../../all_three", "mode-cotd:alpha/../beta", "..", "."])
def test_model_names_with_paths_are_404(served, model):
    assert_openai_error(completion(served, model=model), 404, "model_not_found")


@pytest.mark.parametrize("name", ["../alpha", "/tmp/alpha", "alpha/../beta", "..", "experts/alpha", "alpha\x00"])
def test_mixture_names_with_paths_are_400(served, name):
    assert_openai_error(completion(served, model="mode-cotd", mixture={name: 1.0}), 400, "invalid_mixture")
    assert served.engine.requests == [] and not built(served.service.cache)


def test_adapter_paths_are_confined_to_the_bundle_and_cache(loaded_bundle, tmp_path):
    experts = {name: entry.path for name, entry in loaded_bundle.experts.items()}
    AdapterCache(experts, tmp_path / "cache", 16, 8, FakeEngine(), roots=[loaded_bundle.root])
    escaped = {**experts, "alpha": tmp_path / "elsewhere"}
    with pytest.raises(ConfigError, match="outside the bundle"):
        AdapterCache(escaped, tmp_path / "cache", 16, 8, FakeEngine(), roots=[loaded_bundle.root])
    link = loaded_bundle.root / "experts" / "link"
    link.symlink_to(tmp_path, target_is_directory=True)
    try:
        with pytest.raises(ConfigError, match="outside the bundle"):  # symlinks resolved before the check
            AdapterCache({**experts, "alpha": link}, tmp_path / "cache", 16, 8, FakeEngine(),
                         roots=[loaded_bundle.root])
    finally:
        link.unlink()


# ---------------------------------------------------------------------------- no pickle


def test_no_source_file_unpickles_anything():
    """torch.load only with weights_only=True, and no pickle/marshal/dill loads, in any package of the repo."""
    unsafe = re.compile(r"\b(pickle|cPickle|dill|marshal|joblib)\.loads?\(|\bimport (pickle|dill|joblib)\b")
    torch_load = re.compile(r"\btorch\.load\(([^)]*)\)")
    found = []
    for package in ("mode_cotd", "serving", "training", "benchmarks", "deploy"):
        for path in sorted((paths.REPO_ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for line_no, line in enumerate(text.splitlines(), 1):
                code = line.split("#", 1)[0]
                if unsafe.search(code):
                    found.append(f"{path}:{line_no}: {line.strip()}")
                for args in torch_load.findall(code):
                    if "weights_only=True" not in args:
                        found.append(f"{path}:{line_no}: {line.strip()}")
    assert not found, "\n".join(found)
    assert Path(paths.REPO_ROOT / "serving").is_dir()
