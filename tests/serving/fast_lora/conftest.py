"""Fixtures of the grouped LoRA op tests."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["dense", "by_slot"])
def layout(request, monkeypatch):
    """How the rows outside runs are multiplied (serving.fast_lora.pairs): `dense` (every step small enough) or
    `by_slot` (never dense: loop and batch), so that each test that takes it checks both."""
    from serving.fast_lora import pairs

    dense = request.param == "dense"
    monkeypatch.setattr(pairs, "DENSE_CELLS_PER_PAIR", 10.0**9 if dense else 0.0)
    monkeypatch.setattr(pairs, "DENSE_MAX_ROWS", 10**9 if dense else 0)
    monkeypatch.setattr(pairs, "DENSE_MIN_PAIRS_PER_ROW", 0.0 if dense else 1.0)
    return request.param
