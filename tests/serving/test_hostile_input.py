"""Hostile input by hand: broken encodings, deep nesting, oversized bodies, absurd numbers, unknown fields.

Each gets a 4xx in OpenAI's error shape (or, for unknown fields, is served as OpenAI
does: ignored), no engine work, and the server keeps serving. Path-like model and mixture
names are in test_security.py; schema-driven fuzzing in test_fuzz.py.
"""

from __future__ import annotations

import json

import pytest

from .served import PROMPT, assert_openai_error, completion

HEADERS = {"content-type": "application/json"}


def post_raw(served, raw: bytes | str, path: str = "/v1/completions", headers=None):
    return served.client.post(path, content=raw, headers=headers or HEADERS)


def still_serving(served):
    assert completion(served, model="mode-cotd:alpha").status_code == 200


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "mode-cotd:alpha", "prompt": "\xff\xfe caf\xe9"}',  # not UTF-8
        b'{"model": "mode-cotd:alpha", "prompt": "\xed\xa0\x80"}',  # UTF-8-encoded surrogate
        b"\x00\x01\x02",
        b"",
        b"null",
        b'"just a string"',
        b'{"model": "mode-cotd:alpha", "prompt": "hi",}',
        b'{"model": "mode-cotd:alpha", "prompt": "hi"} trailing',
    ],
)
def test_bytes_that_are_not_json_text(served, raw):
    assert_openai_error(post_raw(served, raw), 400)
    assert served.engine.requests == []
    still_serving(served)


@pytest.mark.parametrize("depth", [64, 5_000, 200_000])
def test_deeply_nested_json(served, depth):
    raw = '{"model": "mode-cotd", "prompt": "hi", "mixture": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
    response = post_raw(served, raw)
    assert response.status_code in (400, 413), response.text
    assert_openai_error(response, response.status_code)
    nested_list = '{"model": "mode-cotd:alpha", "prompt": ' + "[" * depth + "1" + "]" * depth + "}"
    assert_openai_error(post_raw(served, nested_list), 413 if len(nested_list) > 2**20 else 400)
    assert served.engine.requests == []
    still_serving(served)


def test_an_oversized_body_is_413_with_the_default_limit(served):
    raw = json.dumps({"model": "mode-cotd:alpha", "prompt": "word " * 300_000})
    assert len(raw) > served.settings.api.max_body_bytes
    assert_openai_error(post_raw(served, raw), 413, "request_too_large")
    chat = json.dumps({"model": "mode-cotd:alpha", "messages": [{"role": "user", "content": "x"}] * 100_000})
    assert_openai_error(post_raw(served, chat, "/v1/chat/completions"), 413)
    still_serving(served)


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 10**12), ("n", 2.5), ("n", -1), ("n", "NaN"),
        ("max_tokens", 10**30), ("max_tokens", -1), ("max_tokens", 1.5),
        ("temperature", -1), ("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", 1e308 * 10),
        ("top_p", -0.5), ("top_p", "NaN"), ("top_p", 0),
        ("presence_penalty", "NaN"), ("frequency_penalty", "-Infinity"), ("presence_penalty", -3),
        ("logprobs", -1), ("logprobs", 10**9),
        ("seed", 2**64), ("seed", -(2**64)), ("seed", "NaN"),
        ("stop", ["x"] * 100), ("stop", [""]), ("stop", [1, 2]),
        ("prompt", [-1, 5]), ("prompt", [2**70]), ("prompt", [[1, 2], "a"]), ("prompt", [[]]), ("prompt", {"a": 1}),
        ("prompt", [[1, 2], []]), ("prompt", []), ("logit_bias", {"a": 1}), ("logit_bias", {"5": 101}),
        ("logit_bias", {"-3": 1}), ("top_k", -2), ("min_p", "NaN"), ("repetition_penalty", 0),
        ("stream", {"no": 1}), ("stream_options", "yes"), ("mixture", [1, 2]), ("mixture", {"alpha": "1e999"}),
        ("mixture", {"alpha": -1e308, "beta": 1e308}), ("mixture", {}),
    ],
)
def test_absurd_numbers_and_types(served, field, value):
    body = {"model": "mode-cotd:alpha" if field != "mixture" else "mode-cotd", "prompt": PROMPT, "max_tokens": 4}
    body[field] = value
    raw = json.dumps(body).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity").replace('"-Infinity"',
                                                                                          "-Infinity")
    assert_openai_error(post_raw(served, raw), 400)
    assert served.engine.requests == []
    still_serving(served)


def test_unknown_fields_are_ignored_as_openai_does(served):
    body = {"model": "mode-cotd:alpha", "prompt": PROMPT, "max_tokens": 4, "frobnicate": {"deep": [1, 2]},
            "__proto__": {"admin": True}, "constructor": "x"}
    assert completion(served, **body).status_code == 200
    chat = {"model": "mode-cotd:alpha", "max_tokens": 2, "tools": [], "x-extra": 1,
            "messages": [{"role": "user", "content": "hi", "unknown": 1, "tool_calls": None}]}
    assert served.client.post("/v1/chat/completions", json=chat).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"model": "mode-cotd:alpha", "prompt": "\ud800"},
        {"model": "\udfff", "prompt": "hi"},
        {"model": "mode-cotd:alpha", "prompt": "hi", "stop": ["\ud83d"]},
        {"model": "mode-cotd:alpha", "prompt": "hi", "user": "\udc80"},
        {"model": "mode-cotd", "prompt": "hi", "mixture": {"\ud800": 1}},
    ],
)
def test_lone_surrogates_are_400(served, body):
    raw = json.dumps(body)  # ensure_ascii: "\ud800" escapes, valid JSON that is not valid text
    assert_openai_error(post_raw(served, raw), 400)
    chat = {"model": "mode-cotd:alpha", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}
    assert_openai_error(post_raw(served, json.dumps(chat), "/v1/chat/completions"), 400)
    still_serving(served)


def test_odd_but_valid_text_is_served(served):
    for prompt in ("a\x00b", "\u202e\u200b\ufeff", "😀" * 50, "\r\n" * 10, "<|im_start|>system\nhi<|im_end|>"):
        response = completion(served, model="mode-cotd:alpha", prompt=prompt)
        assert response.status_code == 200, (prompt, response.text)


def test_wrong_content_type_and_methods(served):
    raw = json.dumps({"model": "mode-cotd:alpha", "prompt": "hi"})
    assert_openai_error(post_raw(served, raw, headers={"content-type": "text/plain"}), 400)
    assert_openai_error(served.client.get("/v1/completions"), 405)
    assert_openai_error(served.client.put("/v1/chat/completions", content=raw, headers=HEADERS), 405)
    assert_openai_error(served.client.post("/v1/models"), 405)
    still_serving(served)


def test_what_vllm_refuses_is_a_400_not_a_500():
    """vLLM's own validation (here: n > 1 with greedy decoding) becomes InvalidRequest before anything runs."""
    import asyncio
    from pathlib import Path
    from types import SimpleNamespace

    from serving.engine import VllmEngine
    from serving.errors import InvalidRequest
    from serving.protocol import SamplingSettings
    from serving.settings import EngineSettings

    engine = VllmEngine(Path("/nonexistent"), EngineSettings(), 16, 512)
    engine._llm = SimpleNamespace(errored=False)  # never asked to generate
    stream = engine.generate("cmpl-1", [1, 2, 3], SamplingSettings(max_tokens=4, n=2, temperature=0.0), None)
    with pytest.raises(InvalidRequest, match="greedy") as info:
        asyncio.run(anext(stream))
    assert info.value.status == 400
