"""training.recipes.residual_experts: the seeded split, and the bundle its experts stage leaves (no training)."""

from __future__ import annotations

import json
import random

import pytest

from mode_cotd.adapter import save_adapter
from mode_cotd.atomic import write_json_atomic
from mode_cotd.bundle import add_expert, create_bundle, load_bundle, set_gate
from mode_cotd.data import load_task, write_jsonl
from mode_cotd.student import student_identity
from mode_cotd.tasks import SEEN_TASKS, get_task, is_correct
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


def _residual_bundle(tiny_student, tmp_path):
    """A gate bundle over the ten seen tasks, the shared adapter, and a residual bundle as the experts stage
    leaves it (its experts as if trained: the stage trains nothing)."""
    gate_bundle = create_bundle(tmp_path / "default", student_identity(tiny_student))
    for i, task in enumerate(SEEN_TASKS):
        add_expert(gate_bundle, task, random_adapter(tiny_student, r=4, seed=i), task)
    set_gate(gate_bundle, random_gate(list(SEEN_TASKS), grid=0.05))
    shared = tmp_path / "all_data"
    save_adapter(random_adapter(tiny_student, r=4, seed=99), shared)
    residual = tmp_path / "residual"
    recipe.new_bundle(residual, shared, tiny_student)
    for i, task in enumerate(SEEN_TASKS):
        add_expert(residual, task, random_adapter(tiny_student, r=4, seed=100 + i), task)
    choice = {"candidate": "x", "r": 4, "lora_alpha": 8, "lr": 1e-4, "epochs": 1}
    recipe.experts(tmp_path / "out", residual, tiny_student, shared, choice, gate_bundle)
    return residual


def test_the_abstain_stage_calibrates_the_gate_on_prompts_all_data_never_saw(tiny_student, tmp_path):
    residual, out = _residual_bundle(tiny_student, tmp_path), tmp_path / "out"
    unseen = ("aqua", "commonsense_qa", "gsm8k")
    write_json_atomic(out / "split.json", {t: {"val_unseen_by_shared": t in unseen} for t in SEEN_TASKS})
    for k, task in enumerate(unseen):  # four validation examples each, and each route's outcome on them
        examples = [e for e in load_task(task, "train") if e.rationale and is_correct(e.rationale, e.gold,
                                                                                       get_task(task))][:4]
        write_jsonl(out / "data" / f"{task}.val.jsonl", examples)
        for route, right in ((recipe.SHARED, {0, 1}), ("gate", {1, 2, 3} if k else {3})):
            write_json_atomic(out / "val" / f"{task}--{route}.json", {"examples": [
                {"index": i, "gold": e.gold, "prediction": e.rationale if i in right else "I cannot tell."}
                for i, e in enumerate(examples)]})
    result = recipe.abstain(out, residual, tiny_student)  # every unit on disk: no engine starts
    assert result["tasks"] == list(unseen) and result["n"] == 12
    assert (result["shared_accuracy"], result["gate_accuracy"]) == (6 / 12, 7 / 12)
    assert result["accuracy"] >= 7 / 12 and json.loads((out / "abstention.json").read_text()) == result
    gate = load_bundle(residual, student=tiny_student).gate
    assert (gate.config.abstain_below, gate.config.abstain_to) == (result["abstain_below"], recipe.SHARED)
    gate.config.abstain_below = 0.5  # a calibrated gate: its units would not be the gate's own mixtures
    set_gate(residual, gate)
    (out / "val" / "gsm8k--gate.json").unlink()
    with pytest.raises(SystemExit, match="abstains already"):
        recipe.abstain(out, residual, tiny_student)


def test_the_experts_stage_marks_the_shared_adapter_and_copies_the_gate(tiny_student, tmp_path):
    residual = _residual_bundle(tiny_student, tmp_path)
    loaded = load_bundle(residual, student=tiny_student)
    assert loaded.shared == recipe.SHARED and loaded.gate is not None
    assert sorted(loaded.gate.config.experts) == sorted(SEEN_TASKS)
    shared = tmp_path / "all_data"
    with pytest.raises(SystemExit, match="no gate over the ten seen tasks"):
        empty = create_bundle(tmp_path / "nogate", student_identity(tiny_student))
        other = tmp_path / "residual2"
        recipe.new_bundle(other, shared, tiny_student)
        for i, task in enumerate(SEEN_TASKS):
            add_expert(other, task, random_adapter(tiny_student, r=4, seed=200 + i), task)
        choice = {"candidate": "x", "r": 4, "lora_alpha": 8, "lr": 1e-4, "epochs": 1}
        recipe.experts(tmp_path / "out", other, tiny_student, shared, choice, empty)


def test_validation_prompts_too_long_for_the_context_score_wrong_and_never_reach_vllm(tiny_student, data_dir,
                                                                                      tmp_path, monkeypatch):
    from dataclasses import replace

    seen_prompts = []

    class FakeGenerator:
        def __init__(self, *args):
            pass

        def __call__(self, prompts, choices):
            seen_prompts.extend(prompts)
            return [" --> 1 END"] * len(prompts)

        def close(self):
            pass

    monkeypatch.setattr(recipe, "VllmGenerator", FakeGenerator)
    shared = tmp_path / "all_data"
    save_adapter(random_adapter(tiny_student, r=4, seed=99), shared)
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    recipe.new_bundle(bundle, shared, tiny_student)
    examples = load_task("gsm8k", "train", data_dir)[:3]
    examples[1] = replace(examples[1], input=examples[1].input + " word" * 3000)
    write_jsonl(out / "data" / "gsm8k.val.jsonl", examples)
    recipe.val_accuracy(out, bundle, tiny_student, {"gsm8k--all_data": ("gsm8k", "expert:all_data")})
    unit = json.loads((out / "val" / "gsm8k--all_data.json").read_text())
    assert unit["n"] == 3 and unit["too_long"] == 1 and len(seen_prompts) == 2
    assert unit["examples"][1]["prediction"] == ""
