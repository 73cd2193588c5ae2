"""Synthetic bundles: the residual bundle's shape over a shared adapter, or N experts with a random gate."""

from __future__ import annotations

import pytest

from benchmarks.synthetic_bundle import ALL_LINEAR, synthetic_bundle
from mode_cotd.adapter import save_adapter
from mode_cotd.bundle import load_bundle
from mode_cotd.tiny import random_adapter


def test_n_experts_with_a_random_gate(tiny_student, tmp_path):
    root = synthetic_bundle(tmp_path / "b", tiny_student, ["e0", "e1", "e2"], rank=4)
    bundle = load_bundle(root, student=tiny_student, strict=True)
    assert sorted(bundle.experts) == ["e0", "e1", "e2"] and bundle.shared is None
    assert {e.record.r for e in bundle.experts.values()} == {4}
    assert sorted(bundle.experts["e0"].record.target_modules) == sorted(ALL_LINEAR)
    assert bundle.gate.config.experts == ["e0", "e1", "e2"] and bundle.gate.config.feature_dim == 64
    with pytest.raises(SystemExit, match="holds a bundle already"):
        synthetic_bundle(root, tiny_student, ["e0"], rank=4)


def test_like_residual_over_a_shared_adapter_with_a_copied_gate(tiny_student, tmp_path):
    gates = synthetic_bundle(tmp_path / "gates", tiny_student, ["a", "b"], rank=4)
    shared = save_adapter(random_adapter(tiny_student, r=2, seed=5), tmp_path / "all_data")
    root = synthetic_bundle(tmp_path / "res", tiny_student, ["a", "b"], rank=8, shared=shared, gate_from=gates)
    bundle = load_bundle(root, student=tiny_student, strict=True)
    assert bundle.shared == "all_data" and bundle.experts["all_data"].record.r == 2
    assert bundle.gate.config.experts == ["a", "b"]
