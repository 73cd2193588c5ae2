"""The router: the gate over a batch of prompts -> one mixture per prompt.

    prompts [B] -> featuriser -> features [B, D] -> gate -> B Mixtures (top-k, in units of the grid)

A plain class; the router deployment feeds it batches collected by Ray Serve's
`@serve.batch`. Every decision carries its batch's size and latency, and exactly one per
batch is marked first, so the ingress records batch metrics once per batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mode_cotd.featurise import Featuriser, make_featuriser
from mode_cotd.gate import Gate
from serving.protocol import GateDecision


class GateRouter:
    """Scores batches of prompts with a gate."""

    def __init__(self, gate: Gate, featuriser: Featuriser):
        if featuriser.feature_dim != gate.config.feature_dim:
            raise ValueError(
                f"featuriser gives {featuriser.feature_dim} features, the gate expects {gate.config.feature_dim}"
            )
        self.gate = gate.eval()
        self.featuriser = featuriser

    @classmethod
    def for_student(cls, gate: Gate, student: str | Path) -> GateRouter:
        """The gate with the featuriser its config names, built for the student folder."""
        return cls(gate, make_featuriser(gate.config.featuriser, student))

    @property
    def experts(self) -> list[str]:
        return list(self.gate.config.experts)

    @torch.no_grad()
    def decide(self, prompts: Sequence[str]) -> list[GateDecision]:
        """One decision per prompt, in order; the batch is scored in one featuriser and gate call."""
        if not prompts:
            return []
        started = time.perf_counter()
        features = self.featuriser(list(prompts))  # [B, D]
        mixtures = self.gate.mixtures(features)  # B mixtures
        seconds = time.perf_counter() - started
        if len(mixtures) != len(prompts):
            raise RuntimeError(f"gate returned {len(mixtures)} mixtures for {len(prompts)} prompts")
        return [GateDecision(key, len(prompts), seconds, i == 0) for i, key in enumerate(mixtures)]
