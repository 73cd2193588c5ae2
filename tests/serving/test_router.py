"""The router: one gate call per batch, one decision per prompt, batch metrics marked once."""

from __future__ import annotations

import pytest
import torch

from mode_cotd.gate import Gate, GateConfig
from serving.router import GateRouter

PROMPTS = ["Q: 2 + 2?\nA:", "Take the last letters of each word.", "Which is heavier?", "yes or no", "A: B: C:"]


class CountingFeaturiser:
    """Bag-of-bytes features, counting calls."""

    name = "counting"
    feature_dim = 8

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, prompts):
        self.calls.append(len(prompts))
        rows = [[float(sum(ord(c) % (i + 2) for c in p)) for i in range(self.feature_dim)] for p in prompts]
        return torch.tensor(rows)  # [B, 8]


@pytest.fixture
def router() -> GateRouter:
    torch.manual_seed(1)
    gate = Gate(GateConfig(experts=["a", "b", "c"], feature_dim=8, top_k=2, grid=0.1))
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_(0, 3.0)
    return GateRouter(gate, CountingFeaturiser())


def test_one_gate_call_per_batch_and_one_decision_per_prompt(router):
    decisions = router.decide(PROMPTS)
    assert router.featuriser.calls == [5]
    assert len(decisions) == 5
    assert [d.first_in_batch for d in decisions] == [True, False, False, False, False]
    assert {d.batch_size for d in decisions} == {5}
    assert len({d.gate_seconds for d in decisions}) == 1 and decisions[0].gate_seconds > 0
    for d in decisions:
        weights = d.mixture.as_dict()
        assert 1 <= len(weights) <= 2 and sum(weights.values()) == pytest.approx(1.0)
        assert all(round(w * 10) == pytest.approx(w * 10) for w in weights.values())


def test_batching_does_not_change_any_prompts_mixture(router):
    together = [d.mixture for d in router.decide(PROMPTS)]
    alone = [router.decide([p])[0].mixture for p in PROMPTS]
    assert together == alone
    assert len(set(together)) > 1, "a random gate should route these prompts differently"


def test_empty_batch(router):
    assert router.decide([]) == []
    assert router.featuriser.calls == []


def test_featuriser_must_fit_the_gate():
    gate = Gate(GateConfig(experts=["a", "b"], feature_dim=16, top_k=1))
    with pytest.raises(ValueError, match="expects 16"):
        GateRouter(gate, CountingFeaturiser())


def test_bundle_gate_with_the_students_featuriser(loaded_bundle, tiny_student):
    router = GateRouter.for_student(loaded_bundle.gate, tiny_student)
    assert router.experts == ["alpha", "beta", "gamma"]
    decisions = router.decide(PROMPTS)
    assert all(set(d.mixture.experts) <= {"alpha", "beta", "gamma"} for d in decisions)
