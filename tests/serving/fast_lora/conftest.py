"""Fixtures of the grouped LoRA op tests."""

from __future__ import annotations

import shutil

import pytest


def native_kernel_or_skip():
    """The fused kernel (serving.fast_lora.native); skips when it is off or no C++ compiler is installed, fails when
    a compiler is there and the build fails."""
    from serving.fast_lora import native

    if native.disabled():
        pytest.skip(f"{native.ENV}=0")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("no C++ compiler to build the fused LoRA kernel with (the torch layouts serve)")
    built = native.kernel()
    assert built is not None, native.unavailable_reason()
    return built


@pytest.fixture(params=["fused", "fused_in_place", "dense", "by_slot"])
def layout(request, monkeypatch):
    """How the rows outside runs are multiplied (serving.fast_lora.pairs): `fused` (the native kernel; float32 reads
    B gathered while the step has few slots, bfloat16 in place), `fused_in_place` (the kernel reading B in place
    whatever the slots), `dense` (every step small enough) or `by_slot` (never dense: loop and batch), so that each
    test that takes it checks all four. The kernel must build wherever a C++ compiler is found
    (MODE_COTD_NATIVE_LORA=0 turns it off)."""
    from serving.fast_lora import ops, pairs

    if request.param.startswith("fused"):
        native_kernel_or_skip()
        monkeypatch.setattr(pairs, "FLAT_MAX_PAIRS", 10**9)
        if request.param == "fused_in_place":
            monkeypatch.setattr(ops, "GATHER_MAX_GROUPS", -1)
        return request.param
    monkeypatch.setattr(pairs, "FLAT_MAX_PAIRS", -1)  # no flat layout: the torch layouts serve
    dense = request.param == "dense"
    monkeypatch.setattr(pairs, "DENSE_CELLS_PER_PAIR", 10.0**9 if dense else 0.0)
    monkeypatch.setattr(pairs, "DENSE_MAX_ROWS", 10**9 if dense else 0)
    monkeypatch.setattr(pairs, "DENSE_MIN_PAIRS_PER_ROW", 0.0 if dense else 1.0)
    return request.param
