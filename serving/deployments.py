"""The Ray Serve deployments. Thin: each builds its plain piece (serving.components) and wires it.

    IngressDeployment   FastAPI app (serving.api) over a RayBackend of the two handles below
    RouterDeployment    GateRouter behind @serve.batch (max batch size and wait from settings)
    StudentDeployment   StudentService: adapter cache + vLLM engine, streaming generation
    ColocatedDeployment layout "colocated": all three in one replica (FastAPI over the StudentService and the
                        GateRouter in process): no Ray call between them, so a streamed chunk crosses no
                        process but vLLM's own; replicas scale the three together

A student replica's constructor returns only once its vLLM engine is loaded, so Serve counts it
as ready (and routes to it, and stops the replica it replaces in a rollout) only when it can
serve: a rollout or a scale-up drops nothing. A student replica that dies (kill -9, out of
memory) is restarted by Serve; requests it held get 503 + Retry-After, and the ones after it
wait in Serve's bounded queue until the new replica is up, or 503 + Retry-After after
`api.student_wait_timeout_s` (or at once when the queue is full).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from mode_cotd.bundle import Bundle
from serving import components
from serving.api import create_app
from serving.backend import LocalBackend
from serving.errors import ApiError, InternalError, ModelNotFound, ServiceUnavailable
from serving.metrics import ServingMetrics
from serving.protocol import Backend, GateDecision, GenerationEvent, GenerationRequest
from serving.router import GateRouter
from serving.settings import ServeSettings
from serving.student_service import StudentService


def as_api_error(exc: BaseException) -> ApiError:
    """What a failed handle call means for the client: the replica's ApiError, or 503 / 500."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, ApiError):
        return exc.cause
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BackPressureError):
        return ServiceUnavailable(f"the server is overloaded ({exc.message}); retry shortly")
    if isinstance(exc, (RayActorError, ReplicaUnavailableError, WorkerCrashedError, NodeDiedError)):
        return ServiceUnavailable(f"a replica failed ({type(exc).__name__}) and is being restarted; retry shortly",
                                  code="replica_unavailable")
    if isinstance(exc, DeploymentUnavailableError):
        return ServiceUnavailable(f"a deployment is unavailable ({type(exc).__name__}); retry shortly",
                                  code="unavailable")
    return InternalError(f"{type(exc).__name__}: {str(exc)[:500]}")


READY_TIMEOUT_S = 3.0
"""How long /health waits for a student replica to answer before it says 'loading'."""
ADMITTED = "admitted"
"""First item of the student deployment's stream, sent as soon as a replica runs the call: the ingress
times how long Serve held the request before any replica took it (RayBackend.generate)."""


class RayBackend:
    """serving.protocol.Backend over the router and student deployment handles."""

    def __init__(self, router: DeploymentHandle | None, student: DeploymentHandle, student_wait_timeout_s: float):
        self.router = router
        self.student = student
        self.student_wait_timeout_s = student_wait_timeout_s

    async def ready(self) -> bool:
        """False, soon, while no student replica is up (a restart): a health probe must not wait for one."""
        response = self.student.is_ready.remote()
        try:
            return await asyncio.wait_for(asyncio.ensure_future(response), READY_TIMEOUT_S)
        except TimeoutError:
            response.cancel()
            return False

    async def stats(self) -> dict:
        return await self.student.stats.remote()

    async def route(self, text: str) -> GateDecision:
        if self.router is None:
            raise ModelNotFound("this bundle has no gate", param="model")
        try:
            return await self.router.decide.remote(text)
        except Exception as e:
            raise as_api_error(e) from e

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        stream = self.student.options(stream=True).generate.remote(request)
        finished = False
        try:
            try:
                admitted = await asyncio.wait_for(anext(stream), self.student_wait_timeout_s)
            except TimeoutError:
                stream.cancel()  # leave Serve's queue
                raise ServiceUnavailable(
                    f"no student replica took the request within {self.student_wait_timeout_s:g} s "
                    "(restarting, or all busy); retry shortly", code="student_unavailable") from None
            if admitted != ADMITTED:
                raise InternalError(f"the student's stream began with {admitted!r}, not {ADMITTED!r}")
            async for event in stream:
                yield event
            finished = True
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            finished = True
            raise as_api_error(e) from e
        finally:
            if not finished:
                stream.cancel()  # the client went away: the student aborts the request in vLLM


def _replica_student(settings: ServeSettings, bundle: Bundle) -> StudentService:
    """The StudentService of this Serve replica (its id and local rank name it and pick its cores)."""
    context = serve.get_replica_context()
    return components.student_service(settings, bundle, replica=context.replica_id.unique_id,
                                      local_rank=context.rank.local_rank if context.rank is not None else 0)


def _api_app(settings: ServeSettings, bundle: Bundle, backend: Backend):
    """The FastAPI app of an ingress over `backend`."""
    routes = components.ingress_routes(settings, bundle)
    prompts = components.prompt_renderer(settings)
    jobs = components.composition_jobs(settings, bundle, routes, backend, prompts)
    return create_app(backend, routes, prompts, settings.api, ServingMetrics(), jobs)


class _HoldsStudent:
    """A replica that holds the vLLM engine: unhealthy once it stops, shut down with the replica."""

    service: StudentService

    async def check_health(self) -> None:
        if not self.service.ready:
            raise RuntimeError("the student engine stopped")

    def __del__(self) -> None:
        self.service.shutdown()


class _BatchesGate:
    """A replica that scores prompts with the gate in batches (@serve.batch; size and wait from settings)."""

    router: GateRouter | None

    def _batch_as(self, settings: ServeSettings) -> None:
        self.decide_batch.set_max_batch_size(settings.batching.max_batch_size)
        self.decide_batch.set_batch_wait_timeout_s(settings.batching.batch_wait_timeout_s)

    @serve.batch
    async def decide_batch(self, prompts: list[str]) -> list[GateDecision]:
        # One result per prompt, in order; if the gate fails, @serve.batch gives every caller the error. In a thread:
        # off the event loop (the colocated replica's also streams the tokens).
        return await asyncio.to_thread(self.router.decide, prompts)


@serve.deployment(name="student")
class StudentDeployment(_HoldsStudent):
    async def __init__(self, settings: ServeSettings):
        self.service = _replica_student(settings, components.load_serving_bundle(settings))
        await self.service.start()  # ready to Serve only once vLLM is loaded (a raise fails the replica's start)

    async def is_ready(self) -> bool:
        return self.service.ready

    async def stats(self) -> dict:
        return self.service.stats()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent | str]:
        yield ADMITTED  # at once: the ingress stops timing Serve's queue here
        events = self.service.generate(request)
        async with aclosing(events):  # cancelled by the ingress (client gone): vLLM aborts the request
            async for event in events:
                yield event


@serve.deployment(name="router")
class RouterDeployment(_BatchesGate):
    def __init__(self, settings: ServeSettings):
        bundle = components.load_serving_bundle(settings)
        self.router = components.gate_router(settings, bundle)
        if self.router is None:
            raise ValueError(f"{settings.bundle}: the bundle has no gate; the app runs without a router")
        self._batch_as(settings)

    async def decide(self, prompt: str) -> GateDecision:
        return await self.decide_batch(prompt)


class InProcessBackend(LocalBackend):
    """LocalBackend whose gate calls go through `decide` (the colocated replica's @serve.batch method)."""

    def __init__(self, student: StudentService, decide: Callable[[str], Awaitable[GateDecision]] | None):
        super().__init__(student, None)
        self.decide = decide

    async def route(self, text: str) -> GateDecision:
        if self.decide is None:
            return await super().route(text)  # ModelNotFound: no gate
        return await self.decide(text)


@serve.deployment(name="colocated")
@serve.ingress()
class ColocatedDeployment(_HoldsStudent, _BatchesGate):
    async def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.bundle = components.load_serving_bundle(settings)
        self.service = _replica_student(settings, self.bundle)
        self.router = components.gate_router(settings, self.bundle)
        self._batch_as(settings)
        await self.service.start()  # ready to Serve only once vLLM is loaded

    def __serve_build_asgi_app__(self):
        decide = self.decide_batch if self.router is not None else None
        return _api_app(self.settings, self.bundle, InProcessBackend(self.service, decide))


@serve.deployment(name="ingress")
@serve.ingress()
class IngressDeployment:
    def __init__(self, settings: ServeSettings, router: DeploymentHandle | None, student: DeploymentHandle):
        self.settings = settings
        self.backend = RayBackend(router, student, settings.api.student_wait_timeout_s)

    def __serve_build_asgi_app__(self):
        return _api_app(self.settings, components.load_serving_bundle(self.settings), self.backend)
