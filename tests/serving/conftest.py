"""Serving fixtures: a tiny bundle (3 experts, 2 compositions, a gate) and a fake engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mode_cotd.bundle import add_composition, add_expert, create_bundle, load_bundle, set_gate
from mode_cotd.student import student_identity
from mode_cotd.tiny import random_adapter, random_gate
from serving.protocol import GenerationDelta, LoraTarget, SamplingSettings, TokenLogprob

EXPERTS = ("alpha", "beta", "gamma")
EXPERT_RANK = 8


def build_tiny_bundle(root: Path, student: Path) -> Path:
    """3 random rank-8 experts on q/v, an exact and a linear composition, and a random top-2 gate (grid 0.25)."""
    create_bundle(root, student_identity(student))
    for seed, name in enumerate(EXPERTS, start=1):
        adapter = random_adapter(student, r=EXPERT_RANK, lora_alpha=16.0, seed=seed, std=0.3)
        add_expert(root, name, adapter, task=f"task_{name}")
    add_composition(root, "all_three", {"alpha": 0.5, "beta": 0.3, "gamma": 0.2}, "exact", "task_all")
    add_composition(root, "paper_mix", {"alpha": 0.6, "beta": 0.4}, "linear", "task_paper")
    set_gate(root, random_gate(EXPERTS, grid=0.25))
    return root


@pytest.fixture(scope="session")
def tiny_bundle(tiny_student, tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny", tiny_student)


@pytest.fixture(scope="session")
def loaded_bundle(tiny_bundle, tiny_student):
    return load_bundle(tiny_bundle, student=tiny_student)


def fake_prompt_logprobs(token_ids: list[int]) -> list[TokenLogprob]:
    """What FakeEngine says the prompt's logprobs are: token t is "<t>" with logprob -t/100, its top alternative
    "<0>" at -0.01; the first token has none (as vLLM's)."""
    return [TokenLogprob(f"<{t}>", None, None) if i == 0 else TokenLogprob(f"<{t}>", -t / 100, [("<0>", -0.01)])
            for i, t in enumerate(token_ids)]


class FakeEngine:
    """A StudentEngine for unit tests: echoes which adapter served, one character per token."""

    def __init__(self, start_delay: float = 0.0, token_delay: float = 0.0):
        self.started = False
        self.start_delay = start_delay
        self.token_delay = token_delay  # seconds between two tokens of a stream
        self.requests: list[tuple[str, list[int], SamplingSettings, LoraTarget | None]] = []
        self.removed: list[int] = []
        self.loaded: set[int] = set()
        self.aborted: list[str] = []
        self.pinned: list[LoraTarget] = []
        self.paging: dict[str, int] = {}
        """What paging_stats reports (a test sets it)."""

    @property
    def ready(self) -> bool:
        return self.started

    async def start(self, pinned=()) -> None:
        await asyncio.sleep(self.start_delay)
        self.pinned = list(pinned)
        self.loaded.update(t.lora_id for t in pinned)
        self.started = True

    async def generate(self, request_id, prompt_token_ids, sampling, lora) -> AsyncIterator[GenerationDelta]:
        self.requests.append((request_id, list(prompt_token_ids), sampling, lora))
        if lora is not None:
            self.loaded.add(lora.lora_id)
        text = f"[{lora.name if lora else 'base'}]" * 4
        text = text[: sampling.max_tokens]
        prompt = None if sampling.prompt_logprobs is None else fake_prompt_logprobs(prompt_token_ids)
        finished = False
        try:
            for index in range(sampling.n):
                for i, ch in enumerate(text):
                    await asyncio.sleep(self.token_delay)
                    last = i == len(text) - 1
                    yield GenerationDelta(
                        index=index, text=ch, num_tokens=1,
                        logprobs=None if sampling.logprobs is None else [TokenLogprob(ch, -0.5, [(ch, -0.5)])],
                        finish_reason=("length" if len(text) == sampling.max_tokens else "stop") if last else None,
                        prompt_logprobs=prompt,
                    )
                    prompt = None
            finished = True
        finally:
            if not finished:  # like vLLM: a generator closed early aborts its request
                self.aborted.append(request_id)

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        was_loaded = lora_id in self.loaded
        self.loaded.discard(lora_id)
        return was_loaded

    async def lora_slots_in_use(self) -> int:
        return len(self.loaded)

    def queue_depth(self) -> int:
        return 0

    def paging_stats(self) -> dict[str, int]:
        return dict(self.paging)

    def shutdown(self) -> None:
        self.started = False


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def served(tiny_bundle, tiny_student, tmp_path):
    """The app over the plain classes with a started FakeEngine (tests/serving/served.py)."""
    from .served import Served

    s = Served(tiny_bundle, tiny_student, tmp_path)
    s.engine.started = True
    return s
