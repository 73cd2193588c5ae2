"""OpenAI request and response bodies (pydantic), plus mode-cotd's `mixture` and `mode_cotd` fields.

Requests validate ranges (a bad value is a 400 in OpenAI's error shape, see errors.py);
unknown fields are ignored, as OpenAI clients send extras. Responses follow OpenAI's
completion, chat completion, chunk and model-list objects; every response and chunk also
carries `mode_cotd`: the route and the experts (name -> weight) that served it.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

INT64 = (-(2**63), 2**63 - 1)
MAX_STOP_STRINGS = 64
"""Hard ceiling on `stop` strings; the configured limit (api.max_stop_strings, default 4) is checked per request."""

# ---------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    include_usage: bool = False
    """Send a last chunk with `usage` and no choices."""


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = False
    """vLLM's extension: generate max_tokens whatever the tokens (no eos, no end marker); benchmarks use it."""
    mixture: dict[str, Any] | None = None
    """mode-cotd: an explicit {expert: weight} mixture, overriding the gate (model must be the gate's)."""

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings")
        return value

    @model_validator(mode="after")
    def _valid_unicode(self) -> SamplingFields:
        # JSON may carry lone surrogates ("\ud800"): valid JSON, not text; tokenizers and UTF-8 output choke on them.
        _check_unicode(self.model_dump(mode="python"), "")
        return self

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


def _check_unicode(value: Any, where: str) -> None:
    """ValueError naming the first string (or key) that is not valid Unicode text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where or 'body'}: string is not valid Unicode (lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, where)
            _check_unicode(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_unicode(item, f"{where}[{i}]")


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (use n)")
        return self

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (text or token ids); ValueError for a batch of prompts."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("send one prompt per request (a list of several prompts is not supported)")
            prompt = prompt[0]
        return prompt


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        """{"role", "content"} with text parts joined, as chat templates expect."""
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------------------- responses


class ServedBy(BaseModel):
    """Which adapter served a response."""

    route: str
    """gate | expert | composition | base | mixture."""
    name: str | None = None
    """The expert's or composition's name, for those routes."""
    experts: dict[str, float]
    """Expert -> weight of the adapter that served it ({} for the bare student)."""
    adapter: str | None = None
    """vLLM's name of the adapter (an expert folder or a composite), None for the bare student."""
    fallback: str | None = None
    """Set when the gate failed ("error") or timed out ("timeout") and the fallback route served; omitted otherwise."""

    @model_serializer(mode="wrap")
    def _omit_no_fallback(self, handler) -> dict[str, Any]:
        data = handler(self)
        if data.get("fallback") is None:
            data.pop("fallback", None)
        return data


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    mode_cotd: ServedBy


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = []


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    mode_cotd: ServedBy


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    mode_cotd: ServedBy


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mode-cotd"
    mode_cotd: dict[str, Any]
    """{"route": kind, "experts": fixed weights or null, "candidates": experts it may use}."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
