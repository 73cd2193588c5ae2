"""Benchmark fixtures: a tiny bundle (3 random experts, a top-2 gate on the 0.05 grid) over the tiny student."""

from __future__ import annotations

from pathlib import Path

import pytest

from mode_cotd.bundle import add_expert, create_bundle, set_gate
from mode_cotd.student import student_identity
from mode_cotd.tiny import random_adapter, random_gate

EXPERTS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="session")
def bench_bundle(tiny_student, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench-bundle") / "tiny"
    create_bundle(root, student_identity(tiny_student))
    for seed, name in enumerate(EXPERTS, start=1):
        add_expert(root, name, random_adapter(tiny_student, r=8, lora_alpha=16.0, seed=seed, std=0.3),
                   task=f"task_{name}")
    set_gate(root, random_gate(EXPERTS, grid=0.05))
    return root
