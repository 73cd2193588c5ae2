"""The student's inference engine: vLLM's AsyncLLM with multi-LoRA and continuous batching.

`VllmEngine` implements serving.protocol.StudentEngine through vLLM's public API:
`AsyncLLM.from_engine_args(AsyncEngineArgs(...))`, `SamplingParams` (DELTA outputs, so
every yielded piece is new text), `LoRARequest`, `vllm.inputs.tokens_input` (the ingress
sends token ids it has already checked against the context). Cancelling the generator
(the client went away) makes vLLM abort the request. vLLM is imported only here (and in
serving/fast_lora, the vLLM plugin whose grouped LoRA ops `EngineSettings.fast_lora` switches).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import typing
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import psutil

from mode_cotd.adapter import load_adapter
from mode_cotd.compute_dtype import resolve_dtype
from mode_cotd.errors import ConfigError
from mode_cotd.lora_rank import supported_lora_rank
from serving.errors import ApiError, InternalError, InvalidRequest, ServiceUnavailable
from serving.expert_paging import ExpertPager, PagingError, min_resident
from serving.fast_lora import plugin as fast_lora
from serving.lora_admission import LoraAdmission
from serving.protocol import GenerationDelta, LoraTarget, SamplingSettings, TokenLogprob
from serving.settings import EngineSettings
from serving.slot_memory import adapter_bytes, check_slot_memory, slot_bytes

logger = logging.getLogger(__name__)


def vllm_lora_rank(needed: int) -> int:
    """The smallest max_lora_rank vLLM accepts that is >= needed (vLLM takes only the ranks of MaxLoRARanks)."""
    from vllm.config.lora import MaxLoRARanks

    return supported_lora_rank(needed, typing.get_args(MaxLoRARanks))


CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
_CORE_LIST = re.compile(r"^(\d+(-\d+)?)(,\d+(-\d+)?)*(\|(\d+(-\d+)?)(,\d+(-\d+)?)*)*$")  # "0-3" or "0-3|4-7" (one per rank)


def cpu_threads_bind(setting: str, local_rank: int, allowed_cores: list[int]) -> str:
    """The value of vLLM's VLLM_CPU_OMP_THREADS_BIND for `EngineSettings.cpu_threads_bind`.

    "per-replica" gives replica `local_rank` (its rank among this deployment's replicas on the node)
    the core allowed_cores[local_rank % len(allowed_cores)], so replicas on one node run their model
    workers on different cores ("auto" would put every one on the same cores).
    """
    if setting in ("auto", "nobind") or _CORE_LIST.match(setting):
        return setting
    if setting == "per-replica":
        if not allowed_cores:
            raise ConfigError("engine.cpu_threads_bind: this process may use no core")
        return str(sorted(allowed_cores)[local_rank % len(allowed_cores)])
    raise ConfigError(f"engine.cpu_threads_bind: expected 'auto', 'per-replica', 'nobind' or a core list "
                      f"like '0-3', got {setting!r}")


def engine_args(student: Path, settings: EngineSettings, max_lora_rank: int, max_model_len: int, pinned: int = 0):
    """vLLM's AsyncEngineArgs for the student with LoRA enabled; `pinned` adapters get slots of their own."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from serving import forced_tokens  # imports vLLM

    dtype = resolve_dtype(settings.dtype, student)
    if dtype != settings.dtype:
        logger.info("engine.dtype %r -> %r: this CPU has no bf16 arithmetic", settings.dtype, dtype)
    kwargs: dict[str, Any] = {
        "model": str(student),
        "tokenizer": str(student),
        "dtype": dtype,
        "max_model_len": max_model_len,
        "enable_lora": True,
        "max_loras": settings.max_loras + pinned,
        "max_cpu_loras": max(settings.max_cpu_loras, settings.max_loras + pinned),
        "max_lora_rank": max_lora_rank,
        "max_num_seqs": settings.max_num_seqs,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "enforce_eager": settings.enforce_eager,
        "enable_prefix_caching": settings.prefix_caching,
        "stream_interval": settings.stream_interval,
        "seed": settings.seed,
        "disable_log_stats": True,
        "load_format": "safetensors",  # the student's weights are never unpickled (no .bin / .pt fallback)
    }
    if settings.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = settings.kv_cache_memory_bytes
    kwargs.update(settings.extra)
    kwargs["logits_processors"] = [*(kwargs.get("logits_processors") or []), forced_tokens.FQCN]
    if kwargs.get("logprobs_mode", "raw_logprobs") != "raw_logprobs":
        raise ConfigError(f"engine.extra: logprobs_mode {kwargs['logprobs_mode']!r}: composition jobs score forced "
                          "tokens by their raw logprobs (serving/forced_tokens.py); leave it 'raw_logprobs'")
    # the switches reach every vLLM process as engine config (vLLM's additional_config), not the environment
    kwargs["additional_config"] = {**kwargs.get("additional_config", {}),
                                   **fast_lora.engine_config(settings.fast_lora, settings.compile)}
    return AsyncEngineArgs(**kwargs)


def _check_union_wrapper(fast_lora_setting: bool) -> None:
    """ConfigError unless vLLM will run mode-cotd's grouped wrapper, the only one that understands mixture ids."""
    from vllm.platforms import current_platform

    from serving.fast_lora.platform import WRAPPER  # subclasses vLLM's CPU platform: imported with vLLM

    # outside an engine's config the platform answers for the environment; the engine's own switch comes on top
    used = current_platform.get_punica_wrapper() if fast_lora_setting else "vLLM's own (engine.fast_lora is off)"
    if used != WRAPPER:
        raise ConfigError(f"the mixture union needs mode-cotd's grouped LoRA ops, but vLLM would use {used}; "
                          "serve with --no-engine-mixture-union (mixtures as composites)")


def sampling_params(sampling: SamplingSettings):
    """vLLM SamplingParams for one request; outputs come as deltas."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from serving import forced_tokens  # imports vLLM

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        stop=[*sampling.stop, *sampling.end_markers] or None,
        seed=sampling.seed,
        logprobs=sampling.logprobs,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        ignore_eos=sampling.ignore_eos,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
        logit_bias=sampling.logit_bias,
        prompt_logprobs=sampling.prompt_logprobs,
        output_kind=RequestOutputKind.DELTA,
        extra_args={forced_tokens.FORCED_TOKENS_KEY: list(sampling.forced_tokens)} if sampling.forced_tokens else None,
    )


def _kept_marker(choice: Any, sampling: SamplingSettings) -> str:
    """The end marker that stopped a choice (vLLM drops every stop string from the text; markers stay)."""
    if choice.finish_reason == "stop" and choice.stop_reason in sampling.end_markers:
        return choice.stop_reason
    return ""


class VllmEngine:
    """vLLM AsyncLLM for one student; start() loads it (tens of seconds), then generate() streams."""

    def __init__(self, student: Path, settings: EngineSettings, max_lora_rank: int, max_model_len: int,
                 local_rank: int = 0):
        self.student = Path(student)
        self.settings = settings
        self.max_lora_rank = max_lora_rank
        self.max_model_len = max_model_len
        self.cpu_bind = cpu_threads_bind(settings.cpu_threads_bind, local_rank, sorted(os.sched_getaffinity(0)))
        self._llm = None
        self.admission = LoraAdmission(settings.max_loras)
        self.pager: ExpertPager | None = None
        """Pages the union's experts in and out of their slots (engine.resident_experts), or None: all pinned."""

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    async def start(self, pinned: Sequence[LoraTarget] = ()) -> None:
        """Create the engine (in a thread, so the caller's event loop keeps answering health checks).

        `pinned` adapters (the mixture union's members) get slots of their own on top of `max_loras`. They are
        loaded and pinned before any request and never leave their slots, or, with `engine.resident_experts` = K
        below their number, the first K are, and the pager (serving/expert_paging.py) swaps them on demand.
        """
        fast_lora.check(self.settings.fast_lora)  # the installed vLLM is one the grouped ops support
        if self.cpu_bind != "auto":  # "auto" leaves the variable as the environment set it (vLLM's default: auto)
            os.environ[CPU_BIND_ENV] = self.cpu_bind  # read by vLLM's engine core process, which inherits it
        from vllm.v1.engine.async_llm import AsyncLLM

        if pinned:
            _check_union_wrapper(self.settings.fast_lora)
        limit = self._resident_limit(pinned)
        resident = list(pinned)[:limit]
        args = engine_args(self.student, self.settings, self.max_lora_rank, self.max_model_len, len(resident))
        self._check_slot_memory(args.max_loras, len(resident), args.dtype)
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        try:
            await self._pin(llm, resident)
        except BaseException:
            llm.shutdown()
            raise
        self.admission = LoraAdmission(self.settings.max_loras, [t.lora_id for t in pinned])
        if limit < len(pinned):
            self.pager = ExpertPager(pinned, limit, lambda target: self._page_in(llm, target),
                                     lambda target: self._unpin(llm, target), [t.lora_id for t in resident])
            logger.info("%d of the union's %d experts resident, the others paged in on demand", limit, len(pinned))
        self._llm = llm

    def _resident_limit(self, pinned: Sequence[LoraTarget]) -> int:
        """How many of the union's experts may be in slots at once (all of them without engine.resident_experts)."""
        limit = self.settings.resident_experts
        if not pinned or limit is None or limit >= len(pinned):
            return len(pinned)
        pager_min = min_resident(ExpertPager.layout_of(pinned[0].lora_id))
        if limit < pager_min:
            raise ConfigError(f"engine.resident_experts = {limit}: one request of this union can need {pager_min} "
                              f"experts in slots at once; set it to at least {pager_min}")
        return limit

    def _check_slot_memory(self, slots: int, pinned: int, dtype: str) -> None:
        """Refuse, before vLLM allocates them, LoRA slots that host memory cannot hold (the CPU platform: there the
        slots and vLLM's host copies of the pinned experts are host memory; on a GPU vLLM's own memory profile covers
        the slots)."""
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            check_slot_memory(slots, pinned, slot_bytes(self.student, self.max_lora_rank, dtype),
                              psutil.virtual_memory().available,
                              adapter_bytes(self.student, self.max_lora_rank, dtype) or 0)

    @staticmethod
    async def _pin(llm: Any, pinned: Sequence[LoraTarget]) -> None:
        from vllm.lora.request import LoRARequest

        for target in pinned:
            try:
                added = await llm.add_lora(LoRARequest(target.name, target.lora_id, target.path))
                pinned_ok = await llm.pin_lora(target.lora_id)
            except Exception as e:
                raise ConfigError(f"could not load and pin adapter {target.name} ({target.path}): "
                                  f"{type(e).__name__}: {e}") from e
            if not (added and pinned_ok):
                raise ConfigError(f"vLLM did not load and pin adapter {target.name} ({target.path})")

    async def _page_in(self, llm: Any, target: LoraTarget) -> None:
        """Load and pin a paged expert, its folder read and checked here first: a folder vLLM cannot load would
        raise inside its engine core."""
        adapter = await asyncio.to_thread(load_adapter, target.path)  # BundleError naming the file
        if adapter.r > self.max_lora_rank:
            raise ConfigError(f"rank {adapter.r} is over the engine's max LoRA rank {self.max_lora_rank}")
        await self._pin(llm, [target])

    @staticmethod
    async def _unpin(llm: Any, target: LoraTarget) -> None:
        """Unload a paged expert: vLLM's remove_lora frees its slot and host copy, pin included."""
        if not await llm.remove_lora(target.lora_id):
            logger.warning("vLLM held no adapter %s to remove", target.name)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSettings, lora: LoraTarget | None
    ) -> AsyncIterator[GenerationDelta]:
        from vllm.exceptions import VLLMValidationError
        from vllm.lora.request import LoRARequest

        if not self.ready:
            raise ServiceUnavailable("the student is not loaded yet", code="model_loading")
        lora_request = None if lora is None else LoRARequest(lora.name, lora.lora_id, lora.path)
        try:
            params = sampling_params(sampling)
        except VLLMValidationError as e:  # e.g. n > 1 with greedy decoding: the client's mistake, a 400
            raise InvalidRequest(str(e), param=e.parameter) from e
        lora_id = None if lora is None else lora.lora_id
        async with self.admission.hold(lora_id), self._paged(lora_id):
            deltas = self._stream(request_id, prompt_token_ids, params, lora_request, sampling)
            async with aclosing(deltas):  # closing this generator early closes the stream (vLLM aborts)
                async for delta in deltas:
                    yield delta

    @asynccontextmanager
    async def _paged(self, lora_id: int | None) -> AsyncIterator[None]:
        """Hold the union experts `lora_id` reads in their slots (nothing to do when all are pinned)."""
        if self.pager is None:
            yield
            return
        try:
            async with self.pager.hold(lora_id):
                yield
        except PagingError as e:
            raise InternalError(str(e)) from e

    async def _stream(self, request_id: str, prompt_token_ids: list[int], params: Any, lora_request: Any,
                      sampling: SamplingSettings) -> AsyncIterator[GenerationDelta]:
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import tokens_input

        stream = self._llm.generate(
            tokens_input(list(prompt_token_ids)), params, request_id, lora_request=lora_request
        )
        scored = sampling.prompt_logprobs is not None
        try:
            async for output in stream:
                # DELTA outputs carry the prompt's logprobs once, at the end of its prefill
                prompt = self._prompt_logprobs(output, sampling.prompt_logprobs) if scored else None
                for choice in output.outputs:
                    yield GenerationDelta(
                        index=choice.index,
                        text=choice.text + _kept_marker(choice, sampling),
                        num_tokens=len(choice.token_ids),
                        logprobs=self._logprobs(choice, sampling.logprobs),
                        finish_reason=choice.finish_reason,
                        prompt_logprobs=prompt,
                    )
                    prompt = None
                if prompt is not None:  # an output with no choice in it: the prompt's logprobs still go out
                    yield GenerationDelta(index=0, text="", num_tokens=0, prompt_logprobs=prompt)
        except ApiError:
            raise
        except VLLMValidationError as e:
            raise InvalidRequest(str(e), param=e.parameter) from e
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            if type(e).__name__ in ("QueueOverflowError", "MaxQueuedTokensError"):
                raise ServiceUnavailable(f"the engine is overloaded: {e}") from e
            raise InternalError(f"generation failed: {type(e).__name__}: {e}") from e
        finally:
            await stream.aclose()

    def _logprobs(self, choice: Any, top: int | None) -> list[TokenLogprob] | None:
        """OpenAI-style logprobs of the new tokens of one choice."""
        if top is None or choice.logprobs is None:
            return None
        return [self._entry(token_id, candidates or {}, top)
                for token_id, candidates in zip(choice.token_ids, choice.logprobs)]

    def _prompt_logprobs(self, output: Any, top: int | None) -> list[TokenLogprob] | None:
        """The prompt tokens' logprobs of one output (None when it carries none); the first token has none."""
        if top is None or not output.prompt_logprobs:
            return None
        return [TokenLogprob(self._text(token_id, None), None, None) if candidates is None
                else self._entry(token_id, candidates, top)
                for token_id, candidates in zip(output.prompt_token_ids, output.prompt_logprobs)]

    def _entry(self, token_id: int, candidates: Any, top: int) -> TokenLogprob:
        """One token's logprob and its `top` most likely alternatives, from vLLM's {token id: Logprob}."""
        ranked = sorted(candidates.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))
        chosen = candidates.get(token_id)
        return TokenLogprob(
            token=self._text(token_id, chosen),
            logprob=float(chosen.logprob) if chosen is not None else float("-inf"),
            top=[(self._text(t, lp), float(lp.logprob)) for t, lp in ranked[:top]],
        )

    def _text(self, token_id: int, logprob: Any) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self._llm.get_tokenizer().decode([token_id])

    async def remove_lora(self, lora_id: int) -> bool:
        return bool(self._llm is not None and await self._llm.remove_lora(lora_id))

    async def lora_slots_in_use(self) -> int:
        return len(await self._llm.list_loras()) if self._llm is not None else 0

    def paging_stats(self) -> dict[str, int]:
        pager = self.pager
        if pager is None:
            return {}
        return {"experts_resident": len(pager.resident), "expert_page_ins": pager.page_ins,
                "expert_page_outs": pager.page_outs}

    def queue_depth(self) -> int:
        return self._llm.get_num_unfinished_requests() if self._llm is not None else 0

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
