"""Generation deltas -> OpenAI completion / chat objects, whole or as stream chunks.

`ResponseBuilder` is made once per request with its id, model and `mode_cotd` object;
`chunk(delta)` gives the stream chunk of one delta, `add(delta)` accumulates it, and
`final(prompt_tokens)` gives the whole response with `usage`. `EchoResponseBuilder` is the
completions `echo` (the prompt, and its tokens' logprobs, before each choice's output), and
`merge_completions` joins the responses of a list of prompts into one, as vLLM's server does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from serving.errors import InternalError
from serving.protocol import GenerationDelta, TokenLogprob
from serving.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    ServedBy,
    TopLogprob,
    Usage,
)


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


MIN_LOGPROB = -9999.0
"""What -inf is sent as (JSON has no infinity; vLLM's server and OpenAI send this)."""


def completion_logprobs(entries: list[TokenLogprob], text_offset: int) -> CompletionLogprobs:
    """The legacy completions logprobs object, as vLLM's server writes it; offsets count characters from
    `text_offset`. Each top_logprobs dict holds the token itself first, then its top alternatives (so up to
    logprobs + 1 entries); a prompt's first token (echo) has null logprob and top_logprobs."""
    out = CompletionLogprobs()
    offset = text_offset
    for e in entries:
        out.tokens.append(e.token)
        if e.logprob is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            logprob = max(e.logprob, MIN_LOGPROB)
            out.token_logprobs.append(logprob)
            out.top_logprobs.append({e.token: logprob, **{t: max(lp, MIN_LOGPROB) for t, lp in e.top or ()}})
        out.text_offset.append(offset)
        offset += len(e.token)
    return out


def chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    """The chat logprobs object: one entry per token with its top alternatives."""
    return ChatLogprobs(content=[
        ChatTokenLogprob(
            token=e.token,
            logprob=e.logprob,
            bytes=_bytes(e.token),
            top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=_bytes(t)) for t, lp in e.top],
        )
        for e in entries
    ])


@dataclass
class _Choice:
    text: str = ""
    tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    started: bool = False


@dataclass
class ResponseBuilder:
    """Builds the OpenAI objects of one request (kind "completion" or "chat")."""

    kind: str
    request_id: str
    model: str
    served_by: ServedBy
    n: int
    created: int = field(default_factory=lambda: int(time.time()))
    choices: dict[int, _Choice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.choices = {i: _Choice() for i in range(self.n)}

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices.values())

    def add(self, delta: GenerationDelta) -> None:
        """Accumulate one delta into its choice."""
        choice = self.choices[delta.index]
        choice.text += delta.text
        choice.tokens += delta.num_tokens
        if delta.logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason

    def usage(self, prompt_tokens: int) -> Usage:
        completion = self.completion_tokens
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)

    def chunk(self, delta: GenerationDelta) -> CompletionResponse | ChatCompletionChunk:
        """The stream chunk of one delta (call before `add`, which moves the text offset)."""
        choice = self.choices[delta.index]
        if self.kind == "completion":
            logprobs = None if delta.logprobs is None else completion_logprobs(delta.logprobs, len(choice.text))
            return CompletionResponse(
                id=self.request_id, created=self.created, model=self.model, mode_cotd=self.served_by,
                choices=[CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs,
                                          finish_reason=delta.finish_reason)],
            )
        role = None if choice.started else "assistant"
        choice.started = True
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, mode_cotd=self.served_by,
            choices=[ChatChunkChoice(
                index=delta.index,
                delta=ChatDelta(role=role, content=delta.text),
                logprobs=None if delta.logprobs is None else chat_logprobs(delta.logprobs),
                finish_reason=delta.finish_reason,
            )],
        )

    def usage_chunk(self, prompt_tokens: int) -> CompletionResponse | ChatCompletionChunk:
        """The last stream chunk when `stream_options.include_usage`: no choices, only usage."""
        cls = CompletionResponse if self.kind == "completion" else ChatCompletionChunk
        return cls(id=self.request_id, created=self.created, model=self.model, mode_cotd=self.served_by,
                   choices=[], usage=self.usage(prompt_tokens))

    def final(self, prompt_tokens: int) -> CompletionResponse | ChatCompletionResponse:
        """The whole response, with usage."""
        ordered = [self.choices[i] for i in sorted(self.choices)]
        if self.kind == "completion":
            return CompletionResponse(
                id=self.request_id, created=self.created, model=self.model, mode_cotd=self.served_by,
                usage=self.usage(prompt_tokens),
                choices=[CompletionChoice(
                    index=i, text=c.text, finish_reason=c.finish_reason,
                    logprobs=None if c.logprobs is None else completion_logprobs(c.logprobs, 0),
                ) for i, c in enumerate(ordered)],
            )
        return ChatCompletionResponse(
            id=self.request_id, created=self.created, model=self.model, mode_cotd=self.served_by,
            usage=self.usage(prompt_tokens),
            choices=[ChatChoice(
                index=i, message=ChatMessageOut(content=c.text), finish_reason=c.finish_reason,
                logprobs=None if c.logprobs is None else chat_logprobs(c.logprobs),
            ) for i, c in enumerate(ordered)],
        )


@dataclass
class EchoResponseBuilder(ResponseBuilder):
    """A completion with `echo`: each choice's text starts with the prompt's, and with `logprobs` its logprobs
    start with the prompt tokens' (the engine's prompt logprobs: the first token has none). With
    `prompt_only` (max_tokens 0) a choice is the prompt alone: the one token generated is dropped from the text
    and logprobs, and still counted in usage, as vLLM's server does."""

    echo_text: str = ""
    prompt_only: bool = False
    scored: bool = False
    """Logprobs were requested: the prompt's must arrive with the first delta."""
    prompt_logprobs: list[TokenLogprob] | None = None

    def add(self, delta: GenerationDelta) -> None:
        if delta.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = delta.prompt_logprobs
        super().add(delta)

    def final(self, prompt_tokens: int) -> CompletionResponse:
        if self.scored and self.prompt_logprobs is None:
            raise InternalError("the engine returned no prompt logprobs for an echo with logprobs")
        response = super().final(prompt_tokens)
        for out, choice in zip(response.choices, (self.choices[i] for i in sorted(self.choices))):
            out.text = self.echo_text + ("" if self.prompt_only else choice.text)
            if self.scored:
                generated = [] if self.prompt_only else choice.logprobs or []
                out.logprobs = completion_logprobs([*self.prompt_logprobs, *generated], 0)
        return response


def merge_completions(request_id: str, model: str, finals: list[CompletionResponse]) -> CompletionResponse:
    """One completion for a list of prompts, from each prompt's: choices in prompt order (index = prompt · n +
    choice), usage summed, and `mode_cotd.choices` saying what served each choice (the top-level fields are the
    first choice's)."""
    choices, served = [], []
    for final in finals:
        for choice in final.choices:
            choices.append(choice.model_copy(update={"index": len(choices)}))
            served.append(final.mode_cotd)
    prompt_tokens = sum(f.usage.prompt_tokens for f in finals)
    completion_tokens = sum(f.usage.completion_tokens for f in finals)
    return CompletionResponse(
        id=request_id, created=finals[0].created, model=model, choices=choices,
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens),
        mode_cotd=served[0].model_copy(update={"choices": served}),
    )
