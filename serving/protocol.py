"""What the ingress, router and student exchange, and the two seams (engine, backend).

Plain picklable dataclasses: they cross Ray process boundaries unchanged, and tests build
them directly. The seams are Protocols: `StudentEngine` (vLLM, or a fake in unit tests)
and `Backend` (Ray deployment handles, or the plain classes in one process).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mode_cotd.mixture import Mixture


@dataclass(frozen=True)
class AdapterSpec:
    """Which adapter serves a request: a mixture of experts and how it is composed."""

    mixture: Mixture
    """Experts and weights."""
    mode: str = "exact"
    """One of mode_cotd.bundle.COMPOSITION_MODES: "exact" (Σ wᵢ·sᵢ·BᵢAᵢ) or "linear" (the paper's merge)."""

    def single_expert(self) -> str | None:
        """The expert's name when this is one expert at weight 1 (served from its own folder)."""
        if len(self.mixture.experts) == 1 and self.mixture.weights[0] == 1.0:
            return self.mixture.experts[0]
        return None


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling of one request, already validated (OpenAI semantics)."""

    max_tokens: int
    """New tokens per choice at most."""
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    n: int = 1
    """Choices per request."""
    stop: tuple[str, ...] = ()
    """Strings that end a choice (not included in its text)."""
    end_markers: tuple[str, ...] = ()
    """Strings that end a choice and stay in its text (the experts' format end, " END")."""
    seed: int | None = None
    """Per-request sampling seed."""
    logprobs: int | None = None
    """Top log-probabilities returned per output token (None: none)."""
    presence_penalty: float = 0.0
    """OpenAI presence penalty."""
    frequency_penalty: float = 0.0
    """OpenAI frequency penalty."""
    ignore_eos: bool = False
    """Keep generating past eos (vLLM's `ignore_eos`): exactly max_tokens tokens unless `stop` matches."""
    top_k: int = 0
    """Sample from the k most likely tokens only (vLLM's extension; 0 or -1: all)."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one (vLLM's extension; 0: off)."""
    repetition_penalty: float = 1.0
    """Penalise tokens already in the prompt or the output (vLLM's extension; 1: off)."""
    logit_bias: dict[int, float] | None = None
    """Token id -> bias added to its logit (OpenAI's logit_bias)."""
    prompt_logprobs: int | None = None
    """Top log-probabilities returned per prompt token (None: none); completions' `echo` with `logprobs` sets it."""
    forced_tokens: tuple[int, ...] = ()
    """Token ids the choice must emit, in order (serving/forced_tokens.py; max_tokens at most their count): with
    `logprobs=0`, each new token's logprob is the student's own log p of that token given all before it. A
    composition job's scorer sets it; the API never does."""


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenised prompt, its sampling and its adapter (None: the bare student)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSettings
    adapter: AdapterSpec | None = None
    background: bool = False
    """Start only when the replica's engine holds no other request (a runtime composition job's scoring: other
    users' requests go first; StudentService.generate)."""


@dataclass(frozen=True)
class LoraTarget:
    """An adapter folder as vLLM sees it: a unique name, a stable integer id and a path."""

    name: str
    lora_id: int
    path: str


@dataclass
class AdapterReport:
    """How the student got the adapter of one request (recorded as metrics by the ingress)."""

    lora_name: str | None = None
    """vLLM's name of the adapter served (None: the bare student)."""
    outcome: str = "none"
    """"none" (no adapter), "expert" (an expert's own folder), "union" (a mixture over the pinned experts, no
    composite), "hit" (composite ready or being built), "miss" (built it)."""
    build_seconds: float | None = None
    """Time to build the composite, for the request that built it."""
    svd_error: float | None = None
    """Relative error of the SVD compression, when the composite was compressed to fit."""
    evictions: int = 0
    """Composites evicted (disk and vLLM slots) to make room for this one."""
    lora_slots_in_use: int = 0
    """Adapters loaded in vLLM after this request was admitted."""
    replica: str = ""
    """The student replica that served the request."""


@dataclass
class GenerationStarted:
    """First event of every generation stream: the adapter is ready and the request is queued."""

    adapter: AdapterReport
    engine_queue_depth: int = 0
    """Requests unfinished in the engine (waiting or running) when this one was added."""


@dataclass
class TokenLogprob:
    """One token with its log-probability and the top alternatives.

    A prompt's first token has none (`logprob` None, `top` None): nothing precedes it.
    """

    token: str
    logprob: float | None
    top: list[tuple[str, float]] | None = field(default_factory=list)


@dataclass
class GenerationDelta:
    """New output of one choice since the previous delta."""

    index: int
    """Choice index (0..n-1)."""
    text: str
    """New text."""
    num_tokens: int
    """New tokens."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per new token, when requested."""
    finish_reason: str | None = None
    """"stop" or "length" on the choice's last delta."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """One entry per prompt token, on the first delta only, when SamplingSettings.prompt_logprobs is set."""


GenerationEvent = GenerationStarted | GenerationDelta


@dataclass(frozen=True)
class GateDecision:
    """The gate's mixture for one prompt, and the batch it was decided in."""

    mixture: Mixture
    batch_size: int
    """Prompts scored together in that batch."""
    gate_seconds: float
    """Time the batch took (featurise + gate)."""
    first_in_batch: bool
    """True for exactly one prompt per batch, so batch metrics are recorded once."""


class StudentEngine(Protocol):
    """The inference engine under the student deployment (vLLM, or a fake in unit tests)."""

    @property
    def ready(self) -> bool: ...

    async def start(self, pinned: Sequence[LoraTarget] = ()) -> None: ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSettings, lora: LoraTarget | None
    ) -> AsyncIterator[GenerationDelta]: ...

    async def remove_lora(self, lora_id: int) -> bool: ...

    async def lora_slots_in_use(self) -> int: ...

    def paging_stats(self) -> dict[str, int]:
        """The union experts' paging (serving/expert_paging.py): `experts_resident`, `expert_page_ins`,
        `expert_page_outs`; empty when every expert is pinned."""
        ...

    def queue_depth(self) -> int: ...

    def shutdown(self) -> None: ...


class Backend(Protocol):
    """What the HTTP layer calls: the gate, the student, and whether it is loaded."""

    async def ready(self) -> bool: ...

    async def route(self, text: str) -> GateDecision: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]: ...

    async def stats(self) -> dict: ...
