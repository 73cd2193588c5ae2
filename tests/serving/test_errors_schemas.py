"""OpenAI error shapes and status codes, request schemas, and errors crossing Ray."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from serving.errors import (
    ContextLengthExceeded,
    InternalError,
    InvalidMixture,
    InvalidRequest,
    ModelNotFound,
    ServiceUnavailable,
    TooManyRequests,
)
from serving.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest


@pytest.mark.parametrize(
    "error, status, type_, code",
    [
        (InvalidRequest("bad", param="n"), 400, "invalid_request_error", None),
        (ContextLengthExceeded("long", param="prompt"), 400, "invalid_request_error", "context_length_exceeded"),
        (InvalidMixture("nan", param="mixture"), 400, "invalid_request_error", "invalid_mixture"),
        (ModelNotFound("who"), 404, "invalid_request_error", "model_not_found"),
        (TooManyRequests("busy"), 429, "rate_limit_error", "rate_limit_exceeded"),
        (ServiceUnavailable("loading", code="model_loading"), 503, "service_unavailable_error", "model_loading"),
        (InternalError("boom"), 500, "server_error", None),
    ],
)
def test_error_body_and_status(error, status, type_, code):
    assert error.status == status
    body = error.body()
    assert body == {"error": {"message": error.message, "type": type_, "param": error.param, "code": code}}
    copy = pickle.loads(pickle.dumps(error))  # errors cross Ray process boundaries
    assert type(copy) is type(error) and copy.body() == body


def test_errors_raised_in_a_replica_reach_the_client_unchanged():
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    from serving.deployments import as_api_error

    cause = InvalidMixture("unknown expert 'x'", param="mixture")
    wrapped = RayTaskError("generate", "traceback", cause).as_instanceof_cause()
    assert as_api_error(wrapped) is cause
    assert as_api_error(BackPressureError(num_queued_requests=9, max_queued_requests=8)).status == 503
    assert as_api_error(RuntimeError("x")).status == 500


def test_completion_request_defaults_and_limits():
    r = CompletionRequest(model="m", prompt="hi", stop="\n", unknown_field=1)
    assert (r.temperature, r.top_p, r.n, r.max_tokens, r.stream) == (1.0, 1.0, 1, None, False)
    assert r.stop_list() == ("\n",) and r.single_prompt() == "hi"
    assert CompletionRequest(model="m", prompt=["one"]).single_prompt() == "one"
    assert CompletionRequest(model="m", prompt=[1, 2, 3]).single_prompt() == [1, 2, 3]
    assert CompletionRequest(model="m", prompt=[[4, 5]]).single_prompt() == [4, 5]
    batch = CompletionRequest(model="m", prompt=["a", "b"])
    assert batch.is_batch() and batch.prompts() == ["a", "b"]
    assert not CompletionRequest(model="m", prompt=[[4, 5]]).is_batch()
    with pytest.raises(ValueError, match="2 prompts where one was expected"):
        batch.single_prompt()
    assert CompletionRequest(model="m", prompt="hi", echo=True, max_tokens=0).max_tokens == 0
    for bad in ({"max_tokens": 0}, {"temperature": -0.1}, {"top_p": 0}, {"n": 0}, {"stop": ["a"] * 65},
                {"stop": [""]}, {"echo": True, "stream": True}, {"best_of": 3}, {"logprobs": -1},
                {"presence_penalty": 3}, {"top_k": -2}, {"min_p": 1.5}, {"repetition_penalty": 0},
                {"use_beam_search": True}, {"logit_bias": {"5": 500}}, {"add_special_tokens": False}):
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt="hi", **bad)
    # vLLM extensions at their defaults (what vllm bench serve sends) are accepted
    CompletionRequest(model="m", prompt="hi", repetition_penalty=1.0, use_beam_search=False, logit_bias={},
                      stop_token_ids=[], min_tokens=0, add_special_tokens=True)


@pytest.mark.parametrize("prompt, message", [
    ([], "empty list"),
    (["a", [1]], "mixes a string \\(element 0\\) and a token-id list \\(element 1\\)"),
    ([1, 2, "a"], "mixes a token id \\(element 0\\) and a string \\(element 2\\)"),
    ([[1], "a"], "mixes a token-id list"),
    ([{"text": "a"}], "holds a dict"),
    ([["a"]], "valid integer"),
])
def test_bad_prompt_lists_are_named(prompt, message):
    with pytest.raises(ValidationError, match=message):
        CompletionRequest(model="m", prompt=prompt)


def test_chat_request_messages():
    r = ChatCompletionRequest(model="m", messages=[
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ], max_completion_tokens=7)
    assert [m.as_template_dict() for m in r.messages] == [{"role": "system", "content": "s"},
                                                           {"role": "user", "content": "ab"}]
    assert r.requested_max_tokens() == 7
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[])
    with pytest.raises(ValidationError):
        ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}}])
