"""The runtime endpoints (on only with runtime.enabled; behind the API keys when keys are set).

    POST /v1/load_lora_adapter    {"lora_name", "lora_path"}   vLLM's request; 200 with vLLM's plain-text
                                                               "Success: LoRA adapter '<name>' added successfully."
    POST /v1/unload_lora_adapter  {"lora_name"}                vLLM's request; 200 "... removed successfully."
    POST /v1/compositions         {"name", "examples": [{"prompt", "answer"}], "objective"?, "task"?, "priority"?, "mode"?}
                                                               202 + the job document (serving/composition_jobs.py)
    GET  /v1/compositions/{id}    the job document: status, progress, and when done the weights and trace

`lora_name` may be "<name>" or "<served name>:<name>"; the route is "<served name>:<name>" either way.
Errors are OpenAI-shaped (serving/errors.py): 400 naming the field (a path outside the roots, a pickle,
a missing file, an adapter that does not fit the student, too many routes or examples), 404 (unknown
adapter or job), 409 (a name taken by the bundle, a runtime route or a running job), 429 (too many jobs).
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from serving.composition_jobs import CompositionJobs
from serving.errors import InvalidRequest
from serving.runtime_routes import RuntimeRoutes

RUNTIME_POSTS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/compositions")
"""The endpoints that change server state (tests/serving/test_security.py keeps this list honest)."""


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's request body (vllm.entrypoints.serve.lora.protocol)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str
    load_inplace: bool = False
    """vLLM's: replace a loaded adapter of that name; refused here (unload it first: routes in use finish)."""


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_int_id: int | None = None
    """vLLM's; ignored (ids here follow from the adapter's name)."""


class CompositionExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    """The question, as a client would send it."""
    answer: str
    """The expected output: "<rationale>\\n\\n-->\\n\\n<answer>" (the experts' format), or just the answer."""


class CompositionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    """The new route's name: served as "<served name>:<name>"."""
    examples: list[CompositionExample] = Field(max_length=1024)
    """A few solved examples of the task (runtime.max_examples at most)."""
    objective: str | None = None
    """"answer_loss" or "few_shot_loss" (None: runtime.objective)."""
    task: str | None = None
    """A task label recorded with the composition (None: the name)."""
    priority: str | None = None
    """"background" or "shared" (None: runtime.job_priority): how the job's scoring shares the engine."""
    mode: str | None = None
    """"exact" (None) or "linear": how the candidates' experts are mixed, and the route's mode."""


def install_runtime_endpoints(app: FastAPI, routes: RuntimeRoutes, jobs: CompositionJobs) -> None:
    """Add the runtime endpoints to `app`."""

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> PlainTextResponse:
        if body.load_inplace:
            raise InvalidRequest("load_inplace is not supported: unload the adapter, then load it again",
                                 param="load_inplace")
        name = await asyncio.to_thread(routes.load_expert, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> PlainTextResponse:
        name = await asyncio.to_thread(routes.unload, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/compositions", status_code=202)
    async def create_composition(body: CompositionRequest) -> JSONResponse:
        examples = [(e.prompt, e.answer) for e in body.examples]
        document = jobs.start(body.name, examples, body.objective, body.task, body.priority,
                              body.mode)  # starts the search on this loop
        return JSONResponse(document, status_code=202)

    @app.get("/v1/compositions/{job_id}")
    async def get_composition(job_id: str) -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(jobs.get, job_id))
