"""One OpenAI request, end to end: route -> prompt -> gate -> adapter + generation -> response.

    resolve the route (model, mixture)          404 / 400
    tokenise (completion or chat template)      400: empty, over the context length
    admit (in-flight limit)                     429
    gate decides the mixture (route "gate")     batched in the router deployment
    student: adapter leased, generation starts  first event says how the adapter was got
    whole JSON response, or SSE chunks ending with `data: [DONE]`

Errors before the first token keep their HTTP status; an error in the middle of a stream
is sent as an OpenAI error event. Every response and chunk carries `mode_cotd`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from serving.errors import ApiError, InternalError, InvalidRequest, TooManyRequests
from serving.metrics import ServingMetrics
from serving.prompts import PromptRenderer, RenderedPrompt
from serving.protocol import (
    AdapterSpec,
    Backend,
    GenerationDelta,
    GenerationEvent,
    GenerationRequest,
    GenerationStarted,
    SamplingSettings,
)
from serving.responses import ResponseBuilder
from serving.routes import Route, RouteTable
from serving.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, ServedBy
from serving.settings import ApiSettings

logger = logging.getLogger(__name__)


class _Ticket:
    """One admitted request; `release` is idempotent (a stream may end in two ways)."""

    def __init__(self, handler: OpenAIHandler):
        self.handler = handler
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.handler.inflight -= 1
            self.handler.metrics.queue_depth.labels("ingress").set(self.handler.inflight)


class _Timing:
    """Arrival, first token and token count of one request."""

    def __init__(self) -> None:
        self.arrival = time.perf_counter()
        self.first_token: float | None = None

    def seen(self, delta: GenerationDelta) -> None:
        if self.first_token is None and delta.num_tokens > 0:
            self.first_token = time.perf_counter()

    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


class OpenAIHandler:
    """The request pipeline behind /v1/completions and /v1/chat/completions."""

    def __init__(self, backend: Backend, routes: RouteTable, prompts: PromptRenderer,
                 settings: ApiSettings, metrics: ServingMetrics):
        self.backend = backend
        self.routes = routes
        self.prompts = prompts
        self.settings = settings
        self.metrics = metrics
        self.inflight = 0

    # ------------------------------------------------------------------------ endpoints

    async def completions(self, http: Request, body: CompletionRequest) -> Response:
        route = self._route(http, body)
        try:
            prompt = body.single_prompt()
        except ValueError as e:
            raise InvalidRequest(str(e), param="prompt") from e
        rendered = await asyncio.to_thread(self.prompts.completion, prompt)
        sampling = self._sampling(body, route, rendered, body.max_tokens, body.logprobs, "logprobs")
        return await self._serve("completion", body, route, rendered, sampling)

    async def chat(self, http: Request, body: ChatCompletionRequest) -> Response:
        route = self._route(http, body)
        messages = [m.as_template_dict() for m in body.messages]
        rendered = await asyncio.to_thread(self.prompts.chat, messages)
        top = (body.top_logprobs or 0) if body.logprobs else None
        sampling = self._sampling(body, route, rendered, body.requested_max_tokens(), top, "top_logprobs")
        return await self._serve("chat", body, route, rendered, sampling)

    # ------------------------------------------------------------------------ steps

    def _route(self, http: Request, body: SamplingFields) -> Route:
        route = self.routes.resolve(body.model, body.mixture)
        http.state.route = route.kind
        return route

    def _sampling(self, body: SamplingFields, route: Route, rendered: RenderedPrompt, max_tokens: int | None,
                  logprobs: int | None, logprobs_param: str) -> SamplingSettings:
        if body.n > self.settings.max_n:
            raise InvalidRequest(f"n must be <= {self.settings.max_n}, got {body.n}", param="n")
        if logprobs is not None and logprobs > self.settings.max_logprobs:
            raise InvalidRequest(f"{logprobs_param} must be <= {self.settings.max_logprobs}", param=logprobs_param)
        tokens = self.prompts.max_tokens(len(rendered.token_ids), max_tokens, self.settings.default_max_tokens)
        marker = self.settings.adapter_end_marker
        return SamplingSettings(
            max_tokens=tokens, temperature=body.temperature, top_p=body.top_p, n=body.n, stop=body.stop_list(),
            end_markers=(marker,) if marker and route.kind != "base" else (),
            seed=body.seed, logprobs=logprobs, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
        )

    def _admit(self) -> _Ticket:
        if self.inflight >= self.settings.max_inflight_requests:
            raise TooManyRequests(
                f"{self.inflight} requests in flight (limit {self.settings.max_inflight_requests}); retry shortly"
            )
        self.inflight += 1
        self.metrics.queue_depth.labels("ingress").set(self.inflight)
        return _Ticket(self)

    async def _adapter(self, route: Route, rendered: RenderedPrompt) -> AdapterSpec | None:
        if route.kind != "gate":
            return route.adapter
        decision = await self.backend.route(rendered.gate_text)
        self.metrics.record_gate(decision)
        return AdapterSpec(decision.mixture)

    async def _serve(self, kind: str, body: SamplingFields, route: Route, rendered: RenderedPrompt,
                     sampling: SamplingSettings) -> Response:
        ticket = self._admit()
        timing = _Timing()
        events: AsyncIterator[GenerationEvent] | None = None
        streaming = False
        try:
            adapter = await self._adapter(route, rendered)
            request_id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
            events = aiter(self.backend.generate(GenerationRequest(request_id, rendered.token_ids, sampling, adapter)))
            started = await anext(events)
            if not isinstance(started, GenerationStarted):
                raise InternalError("the student's stream did not start with GenerationStarted")
            self.metrics.record_adapter(started.adapter, started.engine_queue_depth)
            served_by = ServedBy(route=route.kind, name=route.name, adapter=started.adapter.lora_name,
                                 experts={} if adapter is None else adapter.mixture.as_dict())
            builder = ResponseBuilder(kind, request_id, body.model, served_by, sampling.n)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                stream = self._sse(events, builder, route, rendered, timing, include_usage, ticket)
                streaming = True
                return EventSourceResponse(stream, background=BackgroundTask(ticket.release))
            async for delta in events:
                timing.seen(delta)
                builder.add(delta)
            self._record(route, rendered, builder, timing)
            return JSONResponse(builder.final(len(rendered.token_ids)).model_dump(mode="json"))
        finally:
            if not streaming:
                ticket.release()
                if events is not None:
                    await events.aclose()

    async def _sse(self, events: AsyncIterator[GenerationEvent], builder: ResponseBuilder, route: Route,
                   rendered: RenderedPrompt, timing: _Timing, include_usage: bool,
                   ticket: _Ticket) -> AsyncIterator[dict]:
        try:
            async for delta in events:
                timing.seen(delta)
                yield {"data": builder.chunk(delta).model_dump_json()}
                builder.add(delta)
            if include_usage:
                yield {"data": builder.usage_chunk(len(rendered.token_ids)).model_dump_json()}
            self._record(route, rendered, builder, timing)
        except ApiError as e:
            yield {"data": json.dumps(e.body())}
        except Exception as e:  # the stream has begun: report in-band, keep serving
            logger.exception("stream failed")
            yield {"data": json.dumps(InternalError(f"stream failed: {type(e).__name__}: {e}").body())}
        finally:
            ticket.release()
            await events.aclose()
        yield {"data": "[DONE]"}

    def _record(self, route: Route, rendered: RenderedPrompt, builder: ResponseBuilder, timing: _Timing) -> None:
        self.metrics.record_success(route.kind, len(rendered.token_ids), builder.completion_tokens,
                                    time.perf_counter() - timing.arrival, timing.ttft())
