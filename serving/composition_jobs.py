"""Compose a new task from a few examples while serving: the paper's few-shot search, scored by the server.

    POST /v1/compositions {"name", "examples": [{"prompt", "answer"}, ...]}   -> 202, a job document
    GET  /v1/compositions/{job id}                                            -> the job document

A job searches weights over the bundle's routed experts (every expert but the shared adapter) with
nevergrad (mode_cotd.weight_search, `runtime.search_budget` candidates, the paper's L1 penalty). Each
candidate is projected to the simplex (w >= 0, Σw = 1) and rounded to the route table's grid with the
units summing to n (mode_cotd.mixture.round_to_grid), so it is a mixture the union serves as a mixture
id: nothing is built. It is scored through the server's own engine, one request per example under the
candidate mixture. When the scored tokens are the example's last FORCED_MAX_TOKENS or fewer (answer_loss),
the request is the example up to them, decoding exactly them (serving/forced_tokens.py): each new token's
logprob is the score, and only those rows go through the vocabulary projection. Otherwise (few_shot_loss
scores the whole answer) the example is the prompt, with `prompt_logprobs` on and one output token. The
objective (`runtime.objective`):

    answer_loss     mean over the answer tokens of -log p(token | everything before), where the answer is
                    the text after "-->" in an answer in the experts' format ("<rationale>\\n\\n-->\\n\\n<answer>"),
                    or the whole answer when it has no "-->"; " END" counts (mode_cotd.shots)
    few_shot_loss   the same over every token of the answer (the paper's)

pooled over the examples' tokens (a token-weighted mean, as training/objectives.py). With
`runtime.job_priority` "background" (the default) the examples are scored one at a time, each starting
only when the engine holds no other request (GenerationRequest.background): the job runs in the engine's
idle time and others' requests wait at most for the one example in flight; "shared" scores them all at once.
(A candidate's examples all at once, in idle time only, was tried: others then waited for a whole candidate,
2.8x idle p50, benchmarks/results/runtime-compose-20261207b/.) The best candidate becomes a runtime
composition "<served name>:<name>" in the job's mode: "exact" (the default; each candidate a union mixture
id) or "linear" (the paper's merge; each candidate a composite the adapter cache builds and vLLM loads, so
slower per candidate). The job document lives in the state folder
(jobs/<id>.json, written after every candidate and every HEARTBEAT_S), so any ingress replica answers for it;
a job whose replica went away stops updating and is reported "failed" (code "interrupted") after STALE_S.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass

import torch

from mode_cotd.bundle import COMPOSITION_MODES
from mode_cotd.errors import ConfigError, ModeCotdError
from mode_cotd.mixture import Mixture, grid_units, round_to_grid
from mode_cotd.shots import scored_positions, shot_from_text, shot_pairs
from mode_cotd.weight_search import SearchSpace, WeightSearch
from serving.errors import ApiError, InternalError, InvalidRequest, ModelNotFound, TooManyRequests
from serving.protocol import AdapterSpec, Backend, GenerationDelta, GenerationRequest, SamplingSettings
from serving.runtime_routes import RuntimeRoutes
from serving.settings import RuntimeSettings

OBJECTIVES = ("answer_loss", "few_shot_loss")
JOB_PRIORITIES = ("background", "shared")
FORCED_MAX_TOKENS = 16
"""An example whose scored tokens are its last this many or fewer is scored by forced decoding (one decode step
per scored token); one with more, by prompt logprobs (one prefill, every row projected)."""
HEARTBEAT_S = 20.0
"""A running job rewrites its document at least this often."""
STALE_S = 120.0
"""A running job whose document was not updated for this long was interrupted (its replica stopped)."""


@dataclass(frozen=True)
class ScoredShot:
    """One example as the engine scores it."""

    token_ids: list[int]
    """Prompt and answer, tokenised as training tokenises them (mode_cotd.format)."""
    scored: list[int]
    """Positions whose -log p counts in the objective."""

    @property
    def forced(self) -> bool:
        """Scored by forced decoding: the scored tokens are the last ones, and few (FORCED_MAX_TOKENS)."""
        first = len(self.token_ids) - len(self.scored)
        return len(self.scored) <= FORCED_MAX_TOKENS and self.scored == list(range(first, len(self.token_ids)))


class CompositionJobs:
    """Starts composition jobs on this ingress replica and reads any job's document from the state folder."""

    def __init__(self, routes: RuntimeRoutes, backend: Backend, tokenizer, settings: RuntimeSettings,
                 max_model_len: int, experts: list[str]):
        self.routes = routes
        self.backend = backend
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_model_len = max_model_len
        self.experts = sorted(experts)
        """The experts a job weighs: the bundle's, the shared adapter aside."""
        self.grid_units = grid_units(routes.base.grid)
        self.running: dict[str, asyncio.Task] = {}
        self._write_lock = threading.Lock()
        self._finished: set[str] = set()
        if settings.job_priority not in JOB_PRIORITIES or settings.objective not in OBJECTIVES:
            raise ConfigError(f"runtime.job_priority must be one of {list(JOB_PRIORITIES)} and runtime.objective one "
                              f"of {list(OBJECTIVES)}; got {settings.job_priority!r}, {settings.objective!r}")

    # ------------------------------------------------------------------------ requests

    def start(self, name: object, examples: list[tuple[str, str]], objective: str | None,
              task: str | None, priority: str | None = None, mode: str | None = None) -> dict:
        """Validate, hold the name, write the job document and start the search; the document (status queued)."""
        if self.routes.state is None:
            raise ModelNotFound("runtime routes are off on this server (runtime.enabled)")
        objective = objective or self.settings.objective
        if objective not in OBJECTIVES:
            raise InvalidRequest(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}", param="objective")
        priority = priority or self.settings.job_priority
        if priority not in JOB_PRIORITIES:
            raise InvalidRequest(f"priority must be one of {list(JOB_PRIORITIES)}, got {priority!r}", param="priority")
        mode = mode or "exact"
        if mode not in COMPOSITION_MODES:
            raise InvalidRequest(f"mode must be one of {list(COMPOSITION_MODES)}, got {mode!r}", param="mode")
        shots = self._shots(examples, objective)
        route = self.routes.route_name(name, "name")
        if len(self.running) >= self.settings.max_jobs:
            raise TooManyRequests(f"{self.settings.max_jobs} composition job(s) running here (runtime.max_jobs); "
                                  "retry when one is done")
        self.routes.claim(route, "name")
        job_id = f"compose-{uuid.uuid4().hex[:16]}"
        document = {
            "id": job_id, "object": "composition.job", "name": route,
            "model": f"{self.routes.served_name}:{route}", "status": "queued", "mode": mode, "priority": priority,
            "objective": objective, "experts": self.experts, "examples": len(shots),
            "created": time.time(), "updated": time.time(),
            "progress": {"evaluations": 0, "budget": self.settings.search_budget, "best_loss": None},
            "result": None, "error": None,
        }
        try:
            self.routes.state.write_job(job_id, document)
        except BaseException:
            self.routes.release(route)
            raise
        job = self.running[job_id] = asyncio.ensure_future(self._run(document, shots, task or route))
        job.add_done_callback(lambda _: self.running.pop(job_id, None))  # the count of running jobs is its size
        return document

    def get(self, job_id: str) -> dict:
        """The job document (404 for an unknown id)."""
        if self.routes.state is None:
            raise ModelNotFound("runtime routes are off on this server (runtime.enabled)")
        try:
            document = self.routes.state.read_job(job_id)
        except ModeCotdError:
            document = None
        if document is None:
            raise ModelNotFound(f"no composition job {job_id!r}", param="id", code="job_not_found")
        if document["status"] in ("queued", "running") and time.time() - document["updated"] > STALE_S:
            document = {**document, "status": "failed",
                        "error": {"message": "the job stopped updating (its server replica went away)",
                                  "code": "interrupted"}}
        return document

    def _shots(self, examples: list[tuple[str, str]], objective: str) -> list[ScoredShot]:
        limit = self.settings.max_examples
        if not examples or len(examples) > limit:
            raise InvalidRequest(f"examples must hold 1 to {limit} examples, got {len(examples)}", param="examples")
        shots = []
        for i, (prompt, answer) in enumerate(examples):
            if not prompt.strip() or not answer.strip():
                raise InvalidRequest(f"examples[{i}]: prompt and answer must be non-empty", param="examples")
            if len(prompt) + len(answer) > self.settings.max_example_chars:
                raise InvalidRequest(f"examples[{i}] has {len(prompt) + len(answer)} characters; at most "
                                     f"{self.settings.max_example_chars} (runtime.max_example_chars)", param="examples")
            example = shot_from_text(prompt, answer)
            (ids, labels), = shot_pairs(self.tokenizer, [example], self.max_model_len - 1,
                                        answer_only=objective == "answer_loss")
            scored = scored_positions(labels)
            if not scored:
                raise InvalidRequest(f"examples[{i}] leaves no answer token within the context of "
                                     f"{self.max_model_len} tokens", param="examples")
            shots.append(ScoredShot(list(ids), scored))
        return shots

    # ------------------------------------------------------------------------ the search

    async def _run(self, document: dict, shots: list[ScoredShot], task: str) -> None:
        state, name = self.routes.state, document["name"]
        started = time.perf_counter()
        heartbeat = asyncio.ensure_future(self._heartbeat(document))
        try:
            document["status"] = "running"
            space = SearchSpace(n=len(self.experts), lower=0.0, upper=1.0, budget=self.settings.search_budget,
                                optimizer=self.settings.optimizer, seed=self.settings.seed, l1=self.settings.l1,
                                simplex=True)
            search, scores = WeightSearch(space), {}
            trace = []
            while not search.done:
                weights = search.ask()
                mixture = self.mixture(weights)
                if mixture not in scores:
                    scores[mixture] = await self._loss(AdapterSpec(mixture, document["mode"]), shots,
                                                       document["priority"] == "background")
                objective = search.tell(weights, scores[mixture])
                trace.append({"weights": mixture.as_dict(), "loss": scores[mixture], "objective": objective})
                best = min(trace, key=lambda t: t["objective"])
                document["progress"] = {"evaluations": len(trace), "budget": space.budget,
                                        "best_loss": best["loss"]}
                document["updated"] = time.time()
                await asyncio.to_thread(self._save, dict(document))
            best = min(trace, key=lambda t: t["objective"])
            seconds = round(time.perf_counter() - started, 3)
            report = {"objective": document["objective"], "examples": len(shots), "loss": best["loss"],
                      "trace": [{"loss": t["loss"], "objective": t["objective"]} for t in trace],
                      "seconds": seconds, "job": document["id"]}
            await asyncio.to_thread(state.add_composition, name, best["weights"], document["mode"], task, report)
            document.update(status="succeeded", result={"weights": best["weights"], "loss": best["loss"],
                                                        "trace": report["trace"], "seconds": seconds})
        except Exception as e:  # noqa: BLE001 - the job reports every failure in its document
            error = e if isinstance(e, ApiError) else InternalError(f"{type(e).__name__}: {str(e)[:300]}")
            document.update(status="failed", error={"message": error.message, "code": error.code})
        finally:
            heartbeat.cancel()
            self.routes.release(name)
            document["updated"] = time.time()
            await asyncio.to_thread(self._save, dict(document))

    async def _heartbeat(self, document: dict) -> None:
        """Rewrite the job document every HEARTBEAT_S while the job runs, so a job waiting for an idle engine (a
        background job on a busy server) is never taken for an interrupted one."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            document["updated"] = time.time()
            await asyncio.to_thread(self._save, dict(document))

    def _save(self, document: dict) -> None:
        """Write a job document (in a worker thread; the caller passes a copy). Once a job's final document is
        written, a heartbeat's write that arrives later is dropped."""
        with self._write_lock:
            if document["id"] in self._finished and document["status"] in ("queued", "running"):
                return
            self.routes.state.write_job(document["id"], document)
            if document["status"] in ("succeeded", "failed"):
                self._finished.add(document["id"])

    def mixture(self, weights: list[float]) -> Mixture:
        """Simplex weights -> the mixture on the grid 1/n, units summing to n (largest remainders)."""
        units = round_to_grid(torch.tensor([weights], dtype=torch.float64), self.grid_units)[0]  # [E]
        return Mixture.from_units(dict(zip(self.experts, units.tolist())), self.grid_units)

    async def _loss(self, adapter: AdapterSpec, shots: list[ScoredShot], background: bool) -> float:
        """Token-weighted mean of -log p over the scored tokens of every shot, under `adapter`."""
        if background:  # one at a time, each in the engine's idle time
            results = [await self._score(adapter, shot, background) for shot in shots]
        else:
            results = await asyncio.gather(*(self._score(adapter, shot, background) for shot in shots))
        total = sum(s for s, _ in results)
        count = sum(c for _, c in results)
        return total / count

    async def _score(self, adapter: AdapterSpec, shot: ScoredShot, background: bool) -> tuple[float, int]:
        """(sum of -log p over the shot's scored tokens, their count)."""
        request_id = f"compose-{uuid.uuid4().hex}"
        if shot.forced:
            first = shot.scored[0]
            answer = tuple(shot.token_ids[first:])
            sampling = SamplingSettings(max_tokens=len(answer), temperature=0.0, logprobs=0, ignore_eos=True,
                                        forced_tokens=answer)
            request = GenerationRequest(request_id, shot.token_ids[:first], sampling, adapter, background=background)
            logprobs = [entry async for entry in self._output_logprobs(request)]
            if len(logprobs) != len(answer):
                raise InternalError(f"the engine scored {len(logprobs)} of {len(answer)} forced tokens")
            nll = [-entry.logprob for entry in logprobs]
        else:
            sampling = SamplingSettings(max_tokens=1, temperature=0.0, prompt_logprobs=0)
            request = GenerationRequest(request_id, shot.token_ids, sampling, adapter, background=background)
            logprobs = await self._prompt_logprobs(request)
            nll = [-logprobs[i].logprob for i in shot.scored]
        return float(sum(nll)), len(nll)

    async def _output_logprobs(self, request: GenerationRequest):
        """The new tokens' logprob entries of the request's one choice, in order."""
        async with aclosing(self.backend.generate(request)) as events:
            async for event in events:
                if isinstance(event, GenerationDelta):
                    for entry in event.logprobs or ():
                        yield entry

    async def _prompt_logprobs(self, request: GenerationRequest) -> list:
        """The prompt tokens' logprob entries of the request."""
        async with aclosing(self.backend.generate(request)) as events:
            async for event in events:
                if isinstance(event, GenerationDelta) and event.prompt_logprobs is not None:
                    return event.prompt_logprobs
        raise InternalError("the engine returned no prompt logprobs")
