"""The scenarios a–g, and the ratios between them that the README reports.

Every scenario sends the same prompts with the same output length (`ignore_eos`; the peft
baseline uses `min_new_tokens`), greedy. Only the server and the route change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.loadgen import RequestSpec
from benchmarks.prompts import Prompt
from benchmarks.workloads import Mixture


@dataclass(frozen=True)
class Scenario:
    """One column of the comparison."""

    key: str
    """Its letter."""
    title: str
    """What it measures."""
    server: str
    """vllm-base | vllm-lora | mode-cotd | peft."""
    route: str
    """student (no adapter) | expert | gate | mixtures (explicit, one per request)."""
    label: str
    """A short name for plots."""


SCENARIOS: dict[str, Scenario] = {s.key: s for s in (
    Scenario("a", "vLLM's own server (`vllm serve`), student, no adapter", "vllm-base", "student", "vLLM, student"),
    Scenario("b", "vLLM's own server, one expert as a LoRA module", "vllm-lora", "expert", "vLLM, one expert"),
    Scenario("c", "mode-cotd, student route", "mode-cotd", "student", "mode-cotd, student"),
    Scenario("d", "mode-cotd, one expert", "mode-cotd", "expert", "mode-cotd, one expert"),
    Scenario("e", "mode-cotd, gate route (top-2 mixtures)", "mode-cotd", "gate", "mode-cotd, gate (top-2)"),
    Scenario("f", "mode-cotd, explicit mixtures, a new weight vector per request", "mode-cotd", "mixtures",
             "mode-cotd, new mixtures"),
    Scenario("g", "transformers + peft, add_weighted_adapter per request, one at a time", "peft", "mixtures",
             "peft, one at a time"),
)}


@dataclass(frozen=True)
class RatioSpec:
    """A headline ratio: output throughput of one scenario over another's."""

    numerator: str
    denominator: str
    target: float | None
    """The issue's target (the ratio should be >= it); None: reported only."""


RATIOS: dict[str, RatioSpec] = {
    "gate_vs_expert": RatioSpec("e", "d", 0.9),
    "expert_vs_vllm_lora": RatioSpec("d", "b", 0.9),
    "student_vs_vllm_base": RatioSpec("c", "a", 0.9),
    "gate_vs_peft": RatioSpec("e", "g", 10.0),
    "gate_vs_student": RatioSpec("e", "c", None),
}
"""Ratio name -> scenarios and target; the JSON's `ratios.<name>`."""

GATE_MODEL = "mode-cotd"
"""mode-cotd's gate route (`api.served_model_name`)."""


def model_for(scenario: Scenario, student_name: str, expert: str) -> str:
    """The `model` field a scenario's requests carry."""
    if scenario.route == "student":
        return student_name
    if scenario.route == "expert":
        return expert if scenario.server == "vllm-lora" else f"{GATE_MODEL}:{expert}"
    return GATE_MODEL


def request_specs(scenario: Scenario, prompts: Sequence[Prompt], max_tokens: int, student_name: str,
                  expert: str, mixtures: Sequence[Mixture] | None = None) -> list[RequestSpec]:
    """One request per prompt; scenario f's carry `mixtures[i]`."""
    model = model_for(scenario, student_name, expert)
    if scenario.route == "mixtures":
        if mixtures is None or len(mixtures) < len(prompts):
            raise ValueError("a mixtures scenario needs one mixture per prompt")
        return [RequestSpec(model, p.text, max_tokens, mixture=dict(m)) for p, m in zip(prompts, mixtures, strict=False)]
    return [RequestSpec(model, p.text, max_tokens) for p in prompts]
