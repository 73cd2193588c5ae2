"""The objective study on a tiny student: every candidate's objectives and accuracy, and the summary."""

from __future__ import annotations

import json

import pytest

from mode_cotd.bundle import add_expert, create_bundle
from mode_cotd.data import load_task, write_jsonl
from mode_cotd.student import student_identity
from mode_cotd.tiny import random_adapter
from training.objectives import OBJECTIVES
from training.recipes import objective_study as study

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_a_unit_scores_every_other_expert_and_the_summary_picks_an_objective(heavy_lock, tiny_student, data_dir,
                                                                            tmp_path):
    bundle = create_bundle(tmp_path / "bundle", student_identity(tiny_student))
    for seed, task in enumerate(("addsub", "gsm8k", "svamp")):
        add_expert(bundle, task, random_adapter(tiny_student, r=4, seed=seed, std=0.3), task)
    residual_out = tmp_path / "residual"
    write_jsonl(residual_out / "data" / "addsub.val.jsonl", load_task("addsub", "train", data_dir)[:8])
    out = tmp_path / "out"
    unit = study.run_task("addsub", bundle, residual_out, tiny_student, out)
    assert sorted(unit["candidates"]) == ["gsm8k", "svamp"]  # addsub's own expert is left out
    assert (unit["shots"], unit["held_out"]) == (study.SHOTS, 3)
    for scores in unit["candidates"].values():
        assert set(scores) == {*OBJECTIVES, "accuracy"} and 0 <= scores["shot_error"] <= 1
    assert json.loads((out / "units" / "addsub.json").read_text()) == unit
    result = study.summary(out)
    assert result["best"] in OBJECTIVES and result["tasks"] == ["addsub"]
    table = (out / "table.md").read_text()
    assert "| addsub | 3 |" in table and "| **mean** (1 tasks) |" in table
