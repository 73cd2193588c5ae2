"""A completions `prompt` that is a list: one choice per prompt (and per n), each prompt routed on its own."""

from __future__ import annotations

import asyncio

import pytest

from serving.prompt_batch import _all
from serving.settings import ApiSettings

from .served import PROMPT, Served, assert_openai_error, completion

QUESTIONS = [f"Infer the correct answer for the question.\n\nQ: What is {a} + {b}?\nA:"
             for a, b in ((2, 3), (17, 40), (123, 9), (8, 8), (1000, 1))]


def test_a_list_of_prompts_gets_one_choice_per_prompt_and_n_in_order(served):
    data = completion(served, model="mode-cotd:alpha", prompt=QUESTIONS[:3], n=2, echo=True, max_tokens=4).json()
    assert [c["index"] for c in data["choices"]] == list(range(6))
    # echo puts each prompt before its choices: choice i·n + j answers prompt i
    assert [c["text"] for c in data["choices"]] == [q + "[exp" for q in QUESTIONS[:3] for _ in range(2)]
    prompt_tokens = sum(len(served.prompts.completion(q).token_ids) for q in QUESTIONS[:3])
    assert data["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 3 * 2 * 4,
                             "total_tokens": prompt_tokens + 24}
    served_by = data["mode_cotd"]
    assert len(served_by["choices"]) == 6 and all(c["route"] == "expert" for c in served_by["choices"])
    assert {k: served_by[k] for k in ("route", "experts")} == {"route": "expert", "experts": {"alpha": 1.0}}
    prompts_sent = [r[1] for r in served.engine.requests[-3:]]
    assert sorted(prompts_sent) == sorted(served.prompts.completion(q).token_ids for q in QUESTIONS[:3])
    assert len({r[0] for r in served.engine.requests[-3:]}) == 3  # each prompt its own engine request


def test_each_prompt_of_a_list_is_routed_by_the_gate_on_its_own(served):
    decided = [served.router.decide([q])[0].mixture.as_dict() for q in QUESTIONS]
    assert len({tuple(sorted(d.items())) for d in decided}) > 1, "the test needs prompts the gate routes apart"
    data = completion(served, model="mode-cotd", prompt=QUESTIONS).json()
    assert [c["experts"] for c in data["mode_cotd"]["choices"]] == decided
    assert all(c["route"] == "gate" for c in data["mode_cotd"]["choices"])
    # a single prompt keeps the single-prompt shape: no per-choice list
    single = completion(served, model="mode-cotd", prompt=QUESTIONS[1]).json()
    assert "choices" not in single["mode_cotd"] and single["mode_cotd"]["experts"] == decided[1]


def test_token_id_lists_and_a_list_of_one(served):
    ids = [served.prompts.completion(q).token_ids for q in QUESTIONS[:2]]
    data = completion(served, model=served.student_name, prompt=ids, max_tokens=3).json()
    assert [c["text"] for c in data["choices"]] == ["[ba", "[ba"]
    assert data["usage"]["prompt_tokens"] == sum(map(len, ids))
    one = completion(served, model=served.student_name, prompt=[ids[0]], max_tokens=3).json()
    assert len(one["choices"]) == 1 and "choices" not in one["mode_cotd"]


@pytest.mark.parametrize("prompt, code, words", [
    ([], None, "empty list"),
    (["a", "b", "c"], "too_many_prompts", "at most 2"),
    (["a", [97, 98]], None, "mixes a string (element 0) and a token-id list (element 1)"),
    ([[97], "a"], None, "mixes a token-id list"),
    (["a", "x" * 2000], "context_length_exceeded", "prompt[1]"),
    (["a", ""], None, "prompt[1]: prompt must not be empty"),
    ([[97], [99999]], None, "prompt[1]"),
])
def test_bad_lists_get_a_clear_400_and_the_server_keeps_serving(tiny_bundle, tiny_student, tmp_path, prompt, code,
                                                                 words):
    s = Served(tiny_bundle, tiny_student, tmp_path, api=ApiSettings(max_prompts=2))
    s.engine.started = True
    error = assert_openai_error(completion(s, model="mode-cotd:alpha", prompt=prompt, echo=True, logprobs=1,
                                           max_tokens=0), 400, code)
    assert words in error["message"] and (error["param"] in ("prompt", None))
    assert not s.engine.requests  # refused before any generation
    good = completion(s, model="mode-cotd:alpha", prompt=["a", PROMPT], echo=True, logprobs=1, max_tokens=0)
    assert good.status_code == 200 and len(good.json()["choices"]) == 2


def test_one_failure_cancels_the_other_prompts():
    cancelled = []

    async def slow():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def failing():
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    async def run():
        with pytest.raises(RuntimeError, match="boom"):
            await _all([slow(), failing(), slow()])

    asyncio.run(run())
    assert cancelled == [True, True]


def test_a_list_is_one_request_and_each_prompt_is_counted(served):
    assert completion(served, model="mode-cotd:alpha", prompt=QUESTIONS, max_tokens=2).status_code == 200
    assert served.sample("mode_cotd_requests_total", {"endpoint": "/v1/completions", "status": "200"}) == 1
    assert served.sample("mode_cotd_prompt_tokens_total") == sum(len(served.prompts.completion(q).token_ids)
                                                                 for q in QUESTIONS)
    assert served.sample("mode_cotd_output_tokens_total") == 2 * len(QUESTIONS)
    assert served.service.open == 0
