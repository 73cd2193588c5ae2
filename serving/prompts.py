"""Prompts: text or chat messages -> the student's token ids, checked against the context.

The ingress tokenises with the student's own tokenizer (the one vLLM loads), so empty
prompts and prompts over the context length are answered with a 400 before any engine
work, and `usage.prompt_tokens` is exact. Chat messages go through the student's chat
template (`apply_chat_template` with the generation prompt), like vLLM's chat renderer;
completion prompts are tokenised with special tokens, chat prompts without (the template
has them), as vLLM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.errors import ContextLengthExceeded, InvalidRequest


@dataclass
class RenderedPrompt:
    """A prompt ready for the engine."""

    token_ids: list[int]
    """What the student reads."""
    gate_text: str
    """What the gate reads: the completion prompt, or the last user message of a chat."""


class PromptRenderer:
    """Tokenises completion prompts and chat conversations for one student."""

    def __init__(self, tokenizer: Any, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    @classmethod
    def from_student(cls, student: str | Path, max_model_len: int) -> PromptRenderer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(student)), max_model_len)

    def completion(self, prompt: str | Sequence[int]) -> RenderedPrompt:
        """A completion prompt: text, or token ids as given."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt must not be empty", param="prompt")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            return RenderedPrompt(list(ids), prompt)
        ids = list(prompt)
        if not ids:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="prompt")
        return RenderedPrompt(ids, self.tokenizer.decode(ids, skip_special_tokens=True))

    def chat(self, messages: list[dict[str, Any]]) -> RenderedPrompt:
        """A conversation through the student's chat template, ending with the assistant's turn."""
        if not messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        if not any(m.get("content") for m in messages):
            raise InvalidRequest("messages hold no content", param="messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja2 TemplateError, ValueError for a missing template...
            raise InvalidRequest(f"the student's chat template rejected the messages: {e}", param="messages") from e
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        users = [m["content"] for m in messages if m.get("role") == "user" and m.get("content")]
        return RenderedPrompt(list(ids), users[-1] if users else messages[-1].get("content") or "")

    def max_tokens(self, prompt_tokens: int, requested: int | None, default: int) -> int:
        """The max_tokens to use: `requested`, or `default` capped by the room left; 400 when it cannot fit."""
        room = self.max_model_len - prompt_tokens
        if room <= 0 or (requested is not None and requested > room):
            asked = f"; you requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the completion)" if requested is not None else f"; the prompt has {prompt_tokens} tokens"
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens{asked}. "
                "Please reduce the length of the prompt or of max_tokens.",
                param="max_tokens" if room > 0 else "prompt",
            )
        return requested if requested is not None else min(default, room)
