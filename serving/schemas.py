"""OpenAI request and response bodies (pydantic), plus mode-cotd's `mixture` and `mode_cotd` fields.

Requests validate ranges (a bad value is a 400 in OpenAI's error shape, see errors.py);
unknown fields are ignored, as OpenAI clients send extras. Responses follow OpenAI's
completion, chat completion, chunk and model-list objects; every response and chunk also
carries `mode_cotd`: the route and the experts (name -> weight) that served it.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

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
    top_k: int = Field(0, ge=-1)
    """vLLM's extension (`vllm bench serve --top-k`): sample among the k most likely tokens; 0 or -1: all."""
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    """vLLM's extension: drop tokens below min_p times the most likely one's probability; 0: off."""
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    """vLLM's extension (`vllm bench serve` always sends 1.0): > 1 discourages repeating tokens; 1: off."""
    logit_bias: dict[int, float] | None = None
    """OpenAI's {token id: bias in [-100, 100]} added to the logits (JSON keys are token ids as strings)."""
    mixture: dict[str, Any] | None = None
    """mode-cotd: an explicit {expert: weight} mixture, overriding the gate (model must be the gate's)."""

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        for token, bias in (value or {}).items():
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError(f"token {token}: logit_bias takes token ids >= 0 and biases in [-100, 100]")
        return value or None

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


_NOT_PASSED_ON = "not implemented (a vLLM sampling extension this server does not pass to the engine)"
_NO_GUIDED = "no structured (guided) decoding here"
REFUSED_COMPLETION_FIELDS: dict[str, tuple[Any, str]] = {
    "use_beam_search": (False, "beam search runs in vLLM's OpenAI server, outside the engine this server drives"),
    "prompt_logprobs": (None, "send echo: true with logprobs (OpenAI's way), which returns the same numbers"),
    "min_tokens": (0, _NOT_PASSED_ON),
    "stop_token_ids": (None, _NOT_PASSED_ON),
    "allowed_token_ids": (None, _NOT_PASSED_ON),
    "bad_words": (None, _NOT_PASSED_ON),
    "logprob_token_ids": (None, _NOT_PASSED_ON),
    "include_stop_str_in_output": (False, "stop strings are always cut from the text (the experts' ' END' is kept)"),
    "truncate_prompt_tokens": (None, "prompts are never truncated: one over the context gets a 400"),
    "prompt_embeds": (None, "the student reads token ids only"),
    "add_special_tokens": (True, "text prompts always get the student's special tokens; send token ids instead"),
    "skip_special_tokens": (True, "output text always skips special tokens"),
    "return_token_ids": (False, "responses carry text and logprobs, not token ids"),
    "return_tokens_as_token_ids": (False, "responses carry text and logprobs, not token ids"),
    "response_format": (None, _NO_GUIDED),
    "structured_outputs": (None, _NO_GUIDED),
    "guided_json": (None, _NO_GUIDED),
    "guided_regex": (None, _NO_GUIDED),
    "guided_choice": (None, _NO_GUIDED),
    "guided_grammar": (None, _NO_GUIDED),
}
"""vLLM extensions of the completions request refused (400) when set to anything but their default (field ->
(default, reason)): ignoring them would silently change results. Other unknown fields are ignored, as before."""


def _check_prompt_list(prompt: list) -> None:
    """ValueError naming the first element of another kind than element 0 (a mixed list), or an element that is
    neither a string, a token id nor a token-id list."""

    def kind(item: Any) -> str:
        if isinstance(item, str):
            return "a string"
        if isinstance(item, int) and not isinstance(item, bool):
            return "a token id"
        if isinstance(item, list):
            return "a token-id list"
        return f"a {type(item).__name__}"

    first = kind(prompt[0])
    for i, item in enumerate(prompt):
        if kind(item) != first:
            raise ValueError(f"mixes {first} (element 0) and {kind(item)} (element {i}): a list must hold only "
                             "strings, only token ids or only token-id lists")
    if first not in ("a string", "a token id", "a token-id list"):
        raise ValueError(f"holds {first}: a list must hold strings, token ids or token-id lists")


class CompletionRequest(SamplingFields):
    """POST /v1/completions: one prompt, or a list of prompts (one response, each prompt routed on its own)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    """0 only with echo: score the prompt, generate nothing (vLLM's convention)."""
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    """Put the prompt (and with logprobs its tokens' logprobs) before each choice's output, as vLLM does."""
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _refused_extensions(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, (default, reason) in REFUSED_COMPLETION_FIELDS.items():
                value = data.get(name)
                if value is not None and value != default and value != [] and value != {}:
                    raise ValueError(f"{name} is not supported: {reason}")
        return data

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if value == []:
            raise ValueError("is an empty list: send at least one prompt")
        try:
            return handler(value)  # the common case costs nothing more than the type's own validation
        except ValidationError:
            if isinstance(value, list):
                _check_prompt_list(value)  # a clear message for the usual mistake, a mixed list
            raise

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported: the student has no fill-in-the-middle tokens")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (vLLM's engine dropped it): use n")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is accepted only with echo (score the prompt, generate nothing)")
        if self.echo and self.stream:
            raise ValueError("echo is not supported with stream: send stream: false")
        if self.stream and self.is_batch():
            raise ValueError("stream is not supported with a list of several prompts: send one request per prompt")
        return self

    def is_batch(self) -> bool:
        """True for a list of several prompts (a list of one is served as that one prompt)."""
        prompt = self.prompt
        return isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], (str, list))

    def prompts(self) -> list[str | list[int]]:
        """Every prompt of the request, in order (text or token ids)."""
        prompt = self.prompt
        if isinstance(prompt, str) or not isinstance(prompt[0], (str, list)):
            return [prompt]
        return list(prompt)

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (text or token ids); ValueError for a list of several prompts."""
        prompts = self.prompts()
        if len(prompts) != 1:
            raise ValueError(f"{len(prompts)} prompts where one was expected")
        return prompts[0]


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
    choices: list[ServedBy] | None = None
    """A list of several prompts only: what served each choice, in choice order (each prompt is routed on its own);
    the fields above are then the first choice's. Omitted otherwise."""

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler) -> dict[str, Any]:
        data = handler(self)
        for key in ("fallback", "choices"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy logprobs object; with echo the prompt's first token has null logprob and top_logprobs."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
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
    """{"route": kind, "experts": fixed weights or null, "candidates": experts it may use, "shared": the bundle's
    shared adapter under the route at weight 1, or null}."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
