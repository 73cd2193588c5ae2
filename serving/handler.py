"""One OpenAI request, end to end: route -> prompt -> gate -> adapter + generation -> response.

    resolve the route (model, mixture)          404 / 400
    admit (in-flight limit)                     429 + Retry-After, before any work
    tokenise (completion or chat template)      400: empty, over the context or a configured limit
    gate decides the mixture (route "gate")     batched in the router; on failure or timeout the
                                                fallback route serves (api.gate_fallback) + a metric
    student: adapter leased, generation starts  first event says how the adapter was got; 503 when full
    whole JSON response, or SSE chunks ending with `data: [DONE]`

Errors before the first token keep their HTTP status (a stream's headers go out with its
first token); an error in the middle of a stream is sent as an OpenAI error event. Every
response and chunk carries `mode_cotd`. A client that goes away stops its generation:
until the response starts the handler watches for the disconnect itself, afterwards
sse-starlette does; either way the generator is closed, which aborts the request in vLLM.
A completions `prompt` that is a list of several prompts goes to serving/prompt_batch.py; `echo`
is serving/echo.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from mode_cotd.errors import ConfigError
from mode_cotd.mixture import Mixture
from serving.echo import completion_builder, echo_sampling
from serving.errors import (
    ApiError,
    InternalError,
    InvalidRequest,
    ServiceUnavailable,
    TooManyRequests,
)
from serving.metrics import ServingMetrics
from serving.prompt_batch import serve_batch
from serving.prompts import PromptRenderer, RenderedPrompt
from serving.protocol import (
    AdapterSpec,
    Backend,
    GenerationEvent,
    GenerationRequest,
    GenerationStarted,
    SamplingSettings,
)
from serving.request_state import CLIENT_CLOSED_REQUEST, ClientDisconnected, RequestTiming
from serving.responses import ResponseBuilder
from serving.routes import Route, RouteTable
from serving.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, ServedBy
from serving.settings import ApiSettings

logger = logging.getLogger(__name__)
request_log = logging.getLogger("mode_cotd.requests")
"""One line per finished request: id, route, status, token counts, seconds (prompt text only with api.log_prompts)."""

T = TypeVar("T")


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


async def _disconnect(http: Request) -> None:
    """Returns when the client has gone away (the ASGI server's `http.disconnect`)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # a server that repeats other messages must not make this spin


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
        self.fallback = self._fallback_adapter(settings.gate_fallback)

    def _fallback_adapter(self, fallback: str | None) -> AdapterSpec | None:
        if fallback is None or fallback == "student":
            return None
        if fallback not in self.routes.experts:
            raise ConfigError(f"api.gate_fallback {fallback!r} is neither 'student' nor an expert of the bundle "
                              f"({', '.join(sorted(self.routes.experts))})")
        return AdapterSpec(Mixture.one(fallback))

    # ------------------------------------------------------------------------ endpoints

    async def completions(self, http: Request, body: CompletionRequest) -> Response:
        route = self._route(http, body)
        if body.is_batch():  # a list of several prompts: serving/prompt_batch.py
            return await serve_batch(self, http, body, route)
        prompt = body.single_prompt()
        ticket = self._admit()  # before any work, so a full server refuses at once
        try:
            rendered = await asyncio.to_thread(self.prompts.completion, prompt)
            sampling = self._sampling(body, route, rendered, body.max_tokens, body.logprobs, "logprobs")
            if body.echo:
                sampling = echo_sampling(sampling, body)
        except BaseException:
            ticket.release()
            raise
        return await self._serve(http, ticket, "completion", body, route, rendered, sampling)

    async def chat(self, http: Request, body: ChatCompletionRequest) -> Response:
        route = self._route(http, body)
        messages = [m.as_template_dict() for m in body.messages]
        top = (body.top_logprobs or 0) if body.logprobs else None
        ticket = self._admit()
        try:
            rendered = await asyncio.to_thread(self.prompts.chat, messages)
            sampling = self._sampling(body, route, rendered, body.requested_max_tokens(), top, "top_logprobs")
        except BaseException:
            ticket.release()
            raise
        return await self._serve(http, ticket, "chat", body, route, rendered, sampling)

    # ------------------------------------------------------------------------ steps

    def _route(self, http: Request, body: SamplingFields) -> Route:
        route = self.routes.resolve(body.model, body.mixture)
        http.state.route = route.kind
        return route

    def _sampling(self, body: SamplingFields, route: Route, rendered: RenderedPrompt, max_tokens: int | None,
                  logprobs: int | None, logprobs_param: str) -> SamplingSettings:
        limits = self.settings
        if body.n > limits.max_n:
            raise InvalidRequest(f"n must be <= {limits.max_n}, got {body.n}", param="n")
        if logprobs is not None and logprobs > limits.max_logprobs:
            raise InvalidRequest(f"{logprobs_param} must be <= {limits.max_logprobs}", param=logprobs_param)
        if len(body.stop_list()) > limits.max_stop_strings:
            raise InvalidRequest(f"stop takes at most {limits.max_stop_strings} strings", param="stop")
        if limits.max_prompt_tokens is not None and len(rendered.token_ids) > limits.max_prompt_tokens:
            raise InvalidRequest(f"the prompt has {len(rendered.token_ids)} tokens; this server accepts at most "
                                 f"{limits.max_prompt_tokens}", param="prompt", code="prompt_too_long")
        default = limits.default_max_tokens
        if limits.max_output_tokens is not None:
            if max_tokens is not None and max_tokens > limits.max_output_tokens:
                raise InvalidRequest(f"max_tokens must be <= {limits.max_output_tokens}, got {max_tokens}",
                                     param="max_tokens")
            default = min(default, limits.max_output_tokens)
        tokens = self.prompts.max_tokens(len(rendered.token_ids), max_tokens, default)
        marker = limits.adapter_end_marker
        return SamplingSettings(
            max_tokens=tokens, temperature=body.temperature, top_p=body.top_p, n=body.n, stop=body.stop_list(),
            end_markers=(marker,) if marker and route.kind != "base" and not body.ignore_eos else (),
            seed=body.seed, logprobs=logprobs, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, ignore_eos=body.ignore_eos,
            top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty, logit_bias=body.logit_bias,
        )

    def client_gone(self, stream: bool) -> Response:
        """Count a request whose client went away, and the (unread) response it gets."""
        self.metrics.client_disconnects.labels("true" if stream else "false").inc()
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    def count_failure(self, error: ApiError) -> None:
        """Count an error that has a metric of its own (a composite that failed to build)."""
        if error.code == "adapter_build_failed":
            self.metrics.composite_build_failures.inc()

    def _admit(self) -> _Ticket:
        if self.inflight >= self.settings.max_inflight_requests:
            raise TooManyRequests(
                f"{self.inflight} requests in flight (limit {self.settings.max_inflight_requests}); retry shortly"
            )
        self.inflight += 1
        self.metrics.queue_depth.labels("ingress").set(self.inflight)
        return _Ticket(self)

    async def _adapter(self, route: Route, rendered: RenderedPrompt) -> tuple[AdapterSpec | None, str | None]:
        """The adapter of the route, and the fallback reason ("timeout", "error") when the gate did not decide."""
        if route.kind != "gate":
            return route.adapter, None
        try:
            decision = await asyncio.wait_for(self.backend.route(rendered.gate_text), self.settings.gate_timeout_s)
        except TimeoutError:
            reason = "timeout"
        except ApiError as e:
            if e.status == 503 and e.code == "overloaded":  # the router's queue is full: the system is, too
                raise
            reason = "error"
            logger.warning("the gate failed (%s: %s)", type(e).__name__, e.message)
        except Exception as e:  # noqa: BLE001 - any gate failure takes the fallback route
            reason = "error"
            logger.warning("the gate failed (%s: %s)", type(e).__name__, e)
        else:
            self.metrics.record_gate(decision)
            return AdapterSpec(decision.mixture), None
        if self.settings.gate_fallback is None:
            raise ServiceUnavailable(f"the gate did not decide ({reason}) and no fallback is configured",
                                     code="gate_unavailable")
        self.metrics.gate_fallbacks.labels(reason).inc()
        return self.fallback, reason

    async def _unless_disconnected(self, http: Request, work: Awaitable[T]) -> T:
        """`work`'s result; if the client goes away first, cancel it and raise ClientDisconnected."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(_disconnect(http))
        try:
            done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task in done:
            return task.result()
        raise ClientDisconnected

    async def _serve(self, http: Request, ticket: _Ticket, kind: str, body: SamplingFields, route: Route,
                     rendered: RenderedPrompt, sampling: SamplingSettings) -> Response:
        """Gate, generation and the response of an admitted request; `ticket` is released when it ends."""
        timing = RequestTiming()
        request_id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        events: AsyncIterator[GenerationEvent] | None = None
        streaming = False
        status = 500
        try:
            adapter, fallback = await self._unless_disconnected(http, self._adapter(route, rendered))
            generation = GenerationRequest(request_id, rendered.token_ids, sampling, adapter)
            events = aiter(self.backend.generate(generation))
            started = await self._unless_disconnected(http, anext(events))
            if not isinstance(started, GenerationStarted):
                raise InternalError("the student's stream did not start with GenerationStarted")
            self.metrics.record_adapter(started.adapter, started.engine_queue_depth)
            served_by = ServedBy(route=route.kind, name=route.name, adapter=started.adapter.lora_name,
                                 experts=self.routes.served_experts(adapter), fallback=fallback)
            builder = (completion_builder(body, body.single_prompt(), self.prompts, request_id, served_by, sampling)
                       if kind == "completion" and body.echo
                       else ResponseBuilder(kind, request_id, body.model, served_by, sampling.n))
            if body.stream:
                # The first delta before the headers: a failure at the start is an HTTP error, not an event.
                first = await self._unless_disconnected(http, anext(events, None))
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                stream = self._sse(first, events, builder, route, rendered, timing, include_usage, ticket, request_id)
                streaming = True
                status = 200
                # Only `data:` events with "\n" line ends, as OpenAI and vLLM send. `vllm bench serve` splits
                # events on "\n\n" only and reads each network chunk stripped: sse-starlette's default "\r\n"
                # lost the events that arrived together, and its keep-alive comment (": ping", every 15 s)
                # stuck in its buffer, so every later event of that stream was lost (ping=0 turns it off).
                return EventSourceResponse(stream, sep="\n", ping=0, background=BackgroundTask(ticket.release))

            async def collect() -> None:
                async for delta in events:
                    timing.seen(delta)
                    builder.add(delta)

            await self._unless_disconnected(http, collect())
            self._record(route, rendered, builder, timing)
            status = 200
            self._log(request_id, route, rendered, status, builder.completion_tokens, timing)
            return JSONResponse(builder.final(len(rendered.token_ids)).model_dump(mode="json"))
        except ClientDisconnected:
            status = CLIENT_CLOSED_REQUEST
            return self.client_gone(bool(body.stream))
        except ApiError as e:
            status = e.status
            self.count_failure(e)
            raise
        finally:
            if not streaming:
                ticket.release()
                if events is not None:
                    await events.aclose()  # closing the stream aborts the request in vLLM
                if status != 200:
                    self._log(request_id, route, rendered, status, 0, timing)

    async def _sse(self, first: GenerationEvent | None, events: AsyncIterator[GenerationEvent],
                   builder: ResponseBuilder, route: Route, rendered: RenderedPrompt, timing: RequestTiming,
                   include_usage: bool, ticket: _Ticket, request_id: str) -> AsyncIterator[dict]:
        status = CLIENT_CLOSED_REQUEST  # unless the stream reaches its end or reports an error
        try:
            if first is not None:
                timing.seen(first)
                yield {"data": builder.chunk(first).model_dump_json()}
                builder.add(first)
                async for delta in events:
                    timing.seen(delta)
                    yield {"data": builder.chunk(delta).model_dump_json()}
                    builder.add(delta)
            if include_usage:
                yield {"data": builder.usage_chunk(len(rendered.token_ids)).model_dump_json()}
            self._record(route, rendered, builder, timing)
            status = 200
        except ApiError as e:
            status = e.status
            yield {"data": json.dumps(e.body())}
        except Exception as e:  # the stream has begun: report in-band, keep serving
            status = 500
            logger.exception("stream failed")
            yield {"data": json.dumps(InternalError(f"stream failed: {type(e).__name__}").body())}
        finally:
            ticket.release()
            await events.aclose()  # also when sse-starlette closes us because the client went away
            if status == CLIENT_CLOSED_REQUEST:
                self.metrics.client_disconnects.labels("true").inc()
            self._log(request_id, route, rendered, status, builder.completion_tokens, timing)
        yield {"data": "[DONE]"}

    def _record(self, route: Route, rendered: RenderedPrompt, builder: ResponseBuilder, timing: RequestTiming) -> None:
        self.metrics.record_success(route.kind, len(rendered.token_ids), builder.completion_tokens,
                                    time.perf_counter() - timing.arrival, timing.ttft())

    def _log(self, request_id: str, route: Route, rendered: RenderedPrompt, status: int, output_tokens: int,
             timing: RequestTiming) -> None:
        if not request_log.isEnabledFor(logging.INFO):
            return
        line = (f"{request_id} model={route.model!r} route={route.kind} status={status} "
                f"prompt_tokens={len(rendered.token_ids)} output_tokens={output_tokens} "
                f"seconds={time.perf_counter() - timing.arrival:.3f}")
        if self.settings.log_prompts:
            line += f" prompt={rendered.gate_text!r}"
        request_log.info(line)
