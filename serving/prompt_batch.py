"""A completions request with a list of prompts: each prompt served as its own request would be, one response.

    prompts [P], P <= api.max_prompts          400 too_many_prompts
    tokenise and check each prompt             400 naming prompt[i] (empty, over the context, a limit)
    per prompt, concurrently: the gate (route "gate": each prompt gets its own mixture), then the student
    one completion: choices in prompt order (index = i·n + j), usage summed, mode_cotd.choices per choice

As in vLLM's server, one prompt's error fails the whole request and aborts the other prompts' generations;
a client that goes away aborts them all. A list is one request for the in-flight limit. Streaming a list is
refused (serving.schemas.CompletionRequest). A single prompt never comes here (OpenAIHandler._serve).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from serving.echo import completion_builder, echo_sampling
from serving.errors import ApiError, InternalError, InvalidRequest
from serving.prompts import PromptRenderer, RenderedPrompt
from serving.protocol import GenerationRequest, GenerationStarted, SamplingSettings
from serving.request_state import CLIENT_CLOSED_REQUEST, ClientDisconnected, RequestTiming
from serving.responses import merge_completions
from serving.routes import Route
from serving.schemas import CompletionRequest, CompletionResponse, ServedBy

T = TypeVar("T")


def _naming(index: int, error: ApiError) -> ApiError:
    """`error` with its message prefixed by the prompt it is about."""
    named = type(error)(f"prompt[{index}]: {error.message}", error.param, error.code)
    named.status = error.status
    return named


def _render(renderer: PromptRenderer, prompts: Sequence[str | list[int]]) -> list[RenderedPrompt]:
    rendered = []
    for i, prompt in enumerate(prompts):
        try:
            rendered.append(renderer.completion(prompt))
        except ApiError as e:
            raise _naming(i, e) from e
    return rendered


async def _all(work: list[Awaitable[T]]) -> list[T]:
    """Every result, in order; on the first error (or cancellation) the rest are cancelled and awaited, so
    their generations are aborted before the error goes out."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _one(handler: Any, body: CompletionRequest, route: Route, prompt: str | list[int],
               rendered: RenderedPrompt, sampling: SamplingSettings, request_id: str, index: int,
               timing: RequestTiming) -> CompletionResponse:
    """One prompt of the list, as OpenAIHandler._serve serves a whole-JSON completion."""
    try:
        adapter, fallback = await handler._adapter(route, rendered)
        events = aiter(handler.backend.generate(
            GenerationRequest(f"{request_id}-{index}", rendered.token_ids, sampling, adapter)))
        try:
            started = await anext(events)
            if not isinstance(started, GenerationStarted):
                raise InternalError("the student's stream did not start with GenerationStarted")
            handler.metrics.record_adapter(started.adapter, started.engine_queue_depth)
            served_by = ServedBy(route=route.kind, name=route.name, adapter=started.adapter.lora_name,
                                 experts=handler.routes.served_experts(adapter), fallback=fallback)
            builder = completion_builder(body, prompt, handler.prompts, request_id, served_by, sampling)
            async for delta in events:
                timing.seen(delta)
                builder.add(delta)
        finally:
            await events.aclose()  # closing the stream aborts the request in vLLM
    except ApiError as e:
        raise _naming(index, e) from e
    handler._record(route, rendered, builder, timing)
    return builder.final(len(rendered.token_ids))


async def serve_batch(handler: Any, http: Request, body: CompletionRequest, route: Route) -> Response:
    """The whole JSON completion of a request whose `prompt` is a list of several prompts.

    `handler` is the serving.handler.OpenAIHandler that calls this with itself; it is typed Any so that this
    module does not import the handler back (which would close an import circle)."""
    prompts = body.prompts()
    limit = handler.settings.max_prompts
    if len(prompts) > limit:
        raise InvalidRequest(f"prompt holds {len(prompts)} prompts; this server takes at most {limit} per request "
                             "(api.max_prompts)", param="prompt", code="too_many_prompts")
    ticket = handler._admit()
    request_id = f"cmpl-{uuid.uuid4().hex}"
    timings = [RequestTiming() for _ in prompts]
    rendered: list[RenderedPrompt] = []
    tokens = [0] * len(prompts)
    status = 500
    try:
        rendered = await asyncio.to_thread(_render, handler.prompts, prompts)
        samplings = []
        for i, one in enumerate(rendered):
            try:
                sampling = handler._sampling(body, route, one, body.max_tokens, body.logprobs, "logprobs")
            except ApiError as e:
                raise _naming(i, e) from e
            samplings.append(echo_sampling(sampling, body) if body.echo else sampling)
        work = [_one(handler, body, route, p, r, s, request_id, i, t)
                for i, (p, r, s, t) in enumerate(zip(prompts, rendered, samplings, timings))]
        finals = await handler._unless_disconnected(http, _all(work))
        tokens = [final.usage.completion_tokens for final in finals]
        status = 200
        return JSONResponse(merge_completions(request_id, body.model, finals).model_dump(mode="json"))
    except ClientDisconnected:
        status = CLIENT_CLOSED_REQUEST
        return handler.client_gone(stream=False)
    except ApiError as e:
        status = e.status
        handler.count_failure(e)
        raise
    finally:
        ticket.release()
        for i, (one, timing) in enumerate(zip(rendered, timings)):
            handler._log(f"{request_id}-{i}", route, one, status, tokens[i], timing)
