"""Forced decoding: a request emits the token ids it names, so the engine scores them (vLLM logits processor).

A composition job (serving/composition_jobs.py) needs -log p of a few answer tokens at the end of each
example. vLLM's `prompt_logprobs` gives them, but computes the vocabulary projection, a log-softmax and a
rank over every prompt row: +18% over the forward pass on the 2-core CPU, five examples under a 10-expert
mixture (docs/performance.md, "Scoring a composition's examples"). Forced decoding scores only the rows that
count: the prompt is the example up to its answer, and step j of the choice may emit only forced[j]:

    logits'[v] = logits[v]   if v == forced[j]
               = -inf        otherwise              (j = tokens the choice has emitted so far)

vLLM computes a request's logprobs from the raw logits, before any logits processor (its default
`logprobs_mode="raw_logprobs"`), so with `logprobs=0` each emitted token's logprob is the student's
log p(forced[j] | prompt, forced[:j]): the same number prompt_logprobs gives at that position, computed in decode
steps instead of the prefill.

The engine registers `ForcedTokens` through vLLM's `logits_processors` engine argument (serving/engine.py);
a request opts in with `SamplingParams.extra_args[FORCED_TOKENS_KEY]` (serving.engine.sampling_params sets it
from SamplingSettings.forced_tokens). Requests without it are untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

FORCED_TOKENS_KEY = "mode_cotd_forced_tokens"
"""The `SamplingParams.extra_args` key: the token ids the choice must emit, in order."""
FQCN = "serving.forced_tokens:ForcedTokens"
"""How vLLM's `logits_processors` engine argument names this processor."""


def force_token(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """One request's logits row [V] with every entry but `token_id` set to -inf (in place)."""
    keep = logits[token_id].clone()
    logits.fill_(float("-inf"))
    logits[token_id] = keep
    return logits


class ForcedTokens(AdapterLogitsProcessor):
    """Per request: at output step j, only extra_args[FORCED_TOKENS_KEY][j] may be emitted."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        forced = (sampling_params.extra_args or {}).get(FORCED_TOKENS_KEY)
        if forced is None:
            return
        if not isinstance(forced, list) or not forced or not all(type(t) is int and t >= 0 for t in forced):
            raise ValueError(f"extra_args[{FORCED_TOKENS_KEY!r}] must be a non-empty list of token ids, "
                             f"got {forced!r}")
        if sampling_params.max_tokens is not None and sampling_params.max_tokens > len(forced):
            raise ValueError(f"max_tokens ({sampling_params.max_tokens}) exceeds the {len(forced)} forced tokens")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes what greedy decoding picks

    def new_req_logits_processor(self, params: SamplingParams) -> Callable | None:
        forced = (params.extra_args or {}).get(FORCED_TOKENS_KEY)
        if not forced:
            return None
        last = len(forced) - 1

        def emit_forced(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:  # logits: [V]
            return force_token(logits, forced[min(len(output_ids), last)])

        return emit_forced
