"""Completions `echo`, as vLLM's server does it: the prompt before each choice, and with `logprobs` its tokens'.

    echo + logprobs k   the engine also scores the prompt: SamplingParams(prompt_logprobs=k), under the
                        request's own adapter or mixture (the same forward pass as the generation)
    echo + max_tokens 0 score the prompt only: the engine generates one token (vLLM needs one), the response
                        drops it from text and logprobs and counts it in usage (vLLM's server does the same)

lm-eval's loglikelihood requests are `echo: true, logprobs: 1, max_tokens: 0 | 1`. Nothing here runs for a
request without echo.
"""

from __future__ import annotations

import dataclasses

from serving.prompts import PromptRenderer
from serving.protocol import SamplingSettings
from serving.responses import EchoResponseBuilder, ResponseBuilder
from serving.schemas import CompletionRequest, ServedBy


def echo_sampling(sampling: SamplingSettings, body: CompletionRequest) -> SamplingSettings:
    """The sampling of an echo request: prompt logprobs when logprobs are asked for, one token for max_tokens 0."""
    return dataclasses.replace(
        sampling,
        prompt_logprobs=body.logprobs,
        max_tokens=1 if body.max_tokens == 0 else sampling.max_tokens,
    )


def completion_builder(body: CompletionRequest, prompt: str | list[int], renderer: PromptRenderer, request_id: str,
                       served_by: ServedBy, sampling: SamplingSettings) -> ResponseBuilder:
    """The response builder of one completion prompt: an EchoResponseBuilder when the request echoes."""
    if not body.echo:
        return ResponseBuilder("completion", request_id, body.model, served_by, sampling.n)
    text = prompt if isinstance(prompt, str) else renderer.tokenizer.decode(prompt)
    return EchoResponseBuilder("completion", request_id, body.model, served_by, sampling.n, echo_text=text,
                               prompt_only=body.max_tokens == 0, scored=sampling.prompt_logprobs is not None)
