"""engine.sampling_params and the engine's logprobs: what vLLM gets from SamplingSettings, and what comes back."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from serving.engine import VllmEngine, sampling_params
from serving.protocol import SamplingSettings, TokenLogprob
from serving.settings import EngineSettings

pytest.importorskip("vllm")


def test_every_sampling_field_reaches_vllm():
    settings = SamplingSettings(max_tokens=7, temperature=0.5, top_p=0.9, n=2, stop=("x",), end_markers=(" END",),
                                seed=3, logprobs=2, presence_penalty=0.1, frequency_penalty=0.2, ignore_eos=True,
                                top_k=5, min_p=0.05, repetition_penalty=1.1, prompt_logprobs=1, logit_bias={7: -100.0})
    params = sampling_params(settings)
    assert (params.max_tokens, params.temperature, params.top_p, params.n, params.seed) == (7, 0.5, 0.9, 2, 3)
    assert params.stop == ["x", " END"] and params.logprobs == 2 and params.ignore_eos
    assert (params.top_k, params.min_p, params.repetition_penalty) == (5, 0.05, 1.1)
    assert params.prompt_logprobs == 1 and params.logit_bias == {7: -100.0}
    plain = sampling_params(SamplingSettings(max_tokens=4))
    assert plain.prompt_logprobs is None and not plain.logit_bias and plain.top_k in (0, -1)
    assert not plain.extra_args


def test_forced_tokens_reach_vllm_for_its_logits_processor():
    from serving.forced_tokens import FORCED_TOKENS_KEY

    params = sampling_params(SamplingSettings(max_tokens=3, temperature=0.0, logprobs=0, forced_tokens=(5, 6, 2)))
    assert params.extra_args == {FORCED_TOKENS_KEY: [5, 6, 2]} and params.max_tokens == 3


def test_prompt_logprobs_come_out_per_prompt_token(tmp_path):
    from vllm.logprobs import Logprob

    engine = VllmEngine(tmp_path, EngineSettings(), max_lora_rank=8, max_model_len=64)
    engine._llm = SimpleNamespace(get_tokenizer=lambda: SimpleNamespace(decode=lambda ids: f"t{ids[0]}"))
    output = SimpleNamespace(prompt_token_ids=[5, 6, 7], prompt_logprobs=[
        None,
        {6: Logprob(-2.0, rank=3, decoded_token="six"), 1: Logprob(-0.5, rank=1, decoded_token="one"),
         2: Logprob(-1.0, rank=2, decoded_token="two")},
        {7: Logprob(-0.1, rank=1, decoded_token="seven")},
    ])
    entries = engine._prompt_logprobs(output, 2)
    assert entries == [TokenLogprob("t5", None, None),
                       TokenLogprob("six", -2.0, [("one", -0.5), ("two", -1.0)]),
                       TokenLogprob("seven", -0.1, [("seven", -0.1)])]
    assert engine._prompt_logprobs(SimpleNamespace(prompt_token_ids=[1], prompt_logprobs=[]), 2) is None
