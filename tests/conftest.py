"""Shared fixtures: the shared data folder and a tiny student built in code."""

from __future__ import annotations

from pathlib import Path

import pytest

from mode_cotd import paths


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared MoDE-CoTD data; tests that need it skip with a reason when it is absent."""
    d = paths.data_dir()
    if not d.is_dir():
        pytest.skip(f"shared data not found at {d} (set MODE_COTD_DATA)")
    return d


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    """A tiny random Llama student (2 layers, hidden 64) saved as an HF folder."""
    from mode_cotd.tiny import build_tiny_student

    return build_tiny_student(tmp_path_factory.mktemp("tiny-student"))
