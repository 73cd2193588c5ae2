"""Completions `echo`: the prompt, and with logprobs its tokens' logprobs, before each choice (as vLLM's server)."""

from __future__ import annotations

from .conftest import fake_prompt_logprobs
from .served import PROMPT, assert_openai_error, completion


def prompt_ids(served, prompt: str = PROMPT) -> list[int]:
    return served.prompts.completion(prompt).token_ids


def test_echo_logprobs_max_tokens_0_scores_the_prompt_only(served):
    """lm-eval's loglikelihood request: echo, logprobs 1, max_tokens 0."""
    data = completion(served, model="mode-cotd:alpha", echo=True, logprobs=1, max_tokens=0, temperature=0).json()
    ids = prompt_ids(served)
    choice = data["choices"][0]
    assert choice["text"] == PROMPT
    lp = choice["logprobs"]
    assert lp["tokens"] == [f"<{t}>" for t in ids]
    assert lp["token_logprobs"] == [None] + [-t / 100 for t in ids[1:]]
    assert lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][1] == {f"<{ids[1]}>": -ids[1] / 100, "<0>": -0.01}  # the token first, then the top 1
    assert lp["text_offset"][:3] == [0, len(f"<{ids[0]}>"), len(f"<{ids[0]}>") + len(f"<{ids[1]}>")]
    # vLLM generates one token it drops, and counts it in usage
    assert data["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
    _, sent_ids, sampling, lora = served.engine.requests[-1]
    assert (sent_ids, sampling.prompt_logprobs, sampling.max_tokens) == (ids, 1, 1)
    assert lora.name == data["mode_cotd"]["adapter"] == "expert-alpha"  # scored under the request's own adapter


def test_echo_with_generation_puts_the_prompt_first(served):
    data = completion(served, model="mode-cotd:beta", echo=True, logprobs=2, max_tokens=3, n=2).json()
    ids = prompt_ids(served)
    for choice in data["choices"]:
        assert choice["text"] == PROMPT + "[ex"
        lp = choice["logprobs"]
        assert lp["tokens"] == [f"<{t}>" for t in ids] + list("[ex")
        assert lp["token_logprobs"][len(ids):] == [-0.5] * 3 and lp["token_logprobs"][0] is None
    assert data["usage"]["completion_tokens"] == 6


def test_echo_without_logprobs_and_with_token_ids(served):
    data = completion(served, model="mode-cotd:alpha", echo=True, max_tokens=2).json()
    assert data["choices"][0]["text"] == PROMPT + "[e" and data["choices"][0]["logprobs"] is None
    assert served.engine.requests[-1][2].prompt_logprobs is None
    ids = prompt_ids(served)
    data = completion(served, model="mode-cotd:alpha", prompt=ids, echo=True, max_tokens=0).json()
    assert data["choices"][0]["text"] == served.prompts.tokenizer.decode(ids) == PROMPT


def test_no_echo_asks_the_engine_for_no_prompt_logprobs(served):
    completion(served, model="mode-cotd:alpha", logprobs=1)
    assert served.engine.requests[-1][2].prompt_logprobs is None


def test_echo_with_a_prompt_over_the_context_is_a_400(served):
    long_prompt = "x" * served.prompts.max_model_len  # no room for the one token vLLM generates
    error = assert_openai_error(completion(served, model="mode-cotd:alpha", prompt=long_prompt, echo=True, logprobs=1,
                                           max_tokens=0), 400, "context_length_exceeded")
    assert "maximum context length" in error["message"]
    fits = "x" * (served.prompts.max_model_len - 1)
    data = completion(served, model="mode-cotd:alpha", prompt=fits, echo=True, logprobs=1, max_tokens=0).json()
    assert len(data["choices"][0]["logprobs"]["tokens"]) == len(fits)


def test_fake_prompt_logprobs_follow_vllm():
    entries = fake_prompt_logprobs([5, 6])
    assert entries[0].logprob is None and entries[0].top is None and entries[1].logprob == -0.06
