"""Scenario g on the tiny student: per-request add_weighted_adapter, exactly max_tokens tokens, timed."""

from __future__ import annotations

import pytest

from benchmarks import peft_baseline
from benchmarks.stats import summarise


@pytest.fixture(scope="module")
def loaded(tiny_student, bench_bundle):
    return peft_baseline.load(tiny_student, bench_bundle, threads=1)


def test_each_request_composes_generates_exactly_max_tokens_and_cleans_up(loaded):
    model, tokenizer = loaded
    requests = [peft_baseline.PeftRequest("Q: 1 + 1?\nA:", {"alpha": 0.7, "beta": 0.3}),
                peft_baseline.PeftRequest("Q: 2 + 2?\nA:", {"gamma": 1.0}),
                peft_baseline.PeftRequest("Q: 3 + 3?\nA:", {"nope": 1.0})]
    records, compose_s = peft_baseline.run(model, tokenizer, requests, max_tokens=6)
    assert [r.ok for r in records] == [True, True, False]
    assert all(r.output_tokens == 6 and r.prompt_tokens > 0 for r in records[:2])
    assert all(r.ttft_s is not None and len(r.itl_s) == 5 and r.tpot_s > 0 for r in records[:2])
    assert len(compose_s) == 2 and all(c >= 0 for c in compose_s)
    assert set(model.peft_config) == {"alpha", "beta", "gamma"}  # the composed adapters were deleted
    assert summarise(records)["output_tokens"] == 12
    assert peft_baseline.environment()["torch_threads"] >= 1


def test_the_composed_adapter_is_the_exact_mixture(loaded):
    """cat composition: alpha at weight 1 gives alpha's own output (greedy)."""
    import torch

    model, tokenizer = loaded
    inputs = tokenizer("Q: 5 + 5?\nA:", return_tensors="pt")
    model.set_adapter("alpha")
    with torch.inference_mode():
        own = model(**inputs).logits
    model.add_weighted_adapter(["alpha"], [1.0], "mix", combination_type="cat")
    model.set_adapter("mix")
    with torch.inference_mode():
        mixed = model(**inputs).logits
    model.delete_adapter("mix")
    assert torch.allclose(own, mixed, atol=1e-4)
