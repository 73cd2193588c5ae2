"""training.recipes.residual_experts: the seeded split, and the bundle its experts stage leaves (no training)."""

from __future__ import annotations

import random

import pytest

from mode_cotd.adapter import save_adapter
from mode_cotd.bundle import add_expert, create_bundle, load_bundle, set_gate
from mode_cotd.student import student_identity
from mode_cotd.tasks import SEEN_TASKS
from mode_cotd.tiny import random_adapter, random_gate
from training.recipes import residual_experts as recipe


def test_the_split_keeps_validation_apart_and_unseen_by_all_data_where_it_can():
    big = recipe.split_task("aqua", 2966)
    size, seed = recipe.SHARED_SUBSAMPLE
    seen_by_shared = set(random.Random(seed).sample(range(2966), size))
    assert len(big.val) == recipe.VAL_MAX and big.val_unseen_by_shared
    assert not set(big.val) & seen_by_shared and not set(big.val) & set(big.train)
    assert len(big.train) == recipe.TRAIN_CAP and not set(big.train) & seen_by_shared  # fresh examples first
    small = recipe.split_task("addsub", 210)
    assert len(small.val) == 42 and not small.val_unseen_by_shared and len(small.train) == 168
    assert recipe.split_task("aqua", 2966) == big, "seeded: the same split every run"


def test_the_experts_stage_marks_the_shared_adapter_and_copies_the_gate(tiny_student, tmp_path):
    gate_bundle = create_bundle(tmp_path / "default", student_identity(tiny_student))
    for i, task in enumerate(SEEN_TASKS):
        add_expert(gate_bundle, task, random_adapter(tiny_student, r=4, seed=i), task)
    set_gate(gate_bundle, random_gate(list(SEEN_TASKS), grid=0.05))
    shared = tmp_path / "all_data"
    save_adapter(random_adapter(tiny_student, r=4, seed=99), shared)
    residual = tmp_path / "residual"
    recipe.new_bundle(residual, shared, tiny_student)
    for i, task in enumerate(SEEN_TASKS):  # as if trained: the stage then trains nothing
        add_expert(residual, task, random_adapter(tiny_student, r=4, seed=100 + i), task)
    choice = {"candidate": "x", "r": 4, "lora_alpha": 8, "lr": 1e-4, "epochs": 1}
    recipe.experts(tmp_path / "out", residual, tiny_student, shared, choice, gate_bundle)
    loaded = load_bundle(residual, student=tiny_student)
    assert loaded.shared == recipe.SHARED and loaded.gate is not None
    assert sorted(loaded.gate.config.experts) == sorted(SEEN_TASKS)
    with pytest.raises(SystemExit, match="no gate over the ten seen tasks"):
        empty = create_bundle(tmp_path / "nogate", student_identity(tiny_student))
        other = tmp_path / "residual2"
        recipe.new_bundle(other, shared, tiny_student)
        for i, task in enumerate(SEEN_TASKS):
            add_expert(other, task, random_adapter(tiny_student, r=4, seed=200 + i), task)
        recipe.experts(tmp_path / "out", other, tiny_student, shared, choice, empty)
