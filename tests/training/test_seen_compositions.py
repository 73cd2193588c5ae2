"""Seen-task compositions: shots from the validation split, one composition per variant, resumable."""

from __future__ import annotations

import json

from mode_cotd.bundle import add_expert, create_bundle, load_bundle, set_shared
from mode_cotd.data import load_task, write_jsonl
from mode_cotd.student import student_identity
from mode_cotd.tiny import random_adapter
from training.recipes import seen_compositions as recipe


def _bundle(root, student, names, shared=None):
    create_bundle(root, student_identity(student))
    for seed, name in enumerate(names):
        add_expert(root, name, random_adapter(student, r=4, seed=seed, std=0.3), name)
    if shared:
        set_shared(root, shared)
    return root


def test_each_variant_records_a_composition_once(tiny_student, data_dir, tmp_path):
    bundles = {"residual": _bundle(tmp_path / "residual", tiny_student, ["all_data", "addsub", "gsm8k"], "all_data"),
               "default": _bundle(tmp_path / "default", tiny_student, ["addsub", "gsm8k"])}
    residual_out, out = tmp_path / "res-out", tmp_path / "out"
    write_jsonl(residual_out / "data" / "addsub.val.jsonl", load_task("addsub", "train", data_dir)[:8])
    done = recipe.run(["residual-exact", "default-linear"], ["addsub"], bundles, residual_out, out, "few_shot_loss",
                      str(tiny_student), budget=2)
    assert [(d["variant"], d["objective"]) for d in done] == [("residual-exact", "few_shot_loss"),
                                                              ("default-linear", "few_shot_loss")]
    residual = load_bundle(bundles["residual"], student=tiny_student, strict=True)
    assert set(residual.compositions["addsub-seen-exact"].weights) == {"addsub", "gsm8k"}  # all_data: underneath
    assert load_bundle(bundles["default"], student=tiny_student).compositions["addsub-seen-linear"].mode == "linear"
    report = json.loads((out / "reports" / "residual-addsub-seen-exact.json").read_text())
    assert report["shots"]["n"] == recipe.SHOTS and report["shared"] == "all_data"
    assert recipe.run(["residual-exact", "default-linear"], ["addsub"], bundles, residual_out, out, "few_shot_loss",
                      str(tiny_student), budget=2) == []  # resumed: nothing left to search


def test_the_objective_is_the_studys_winner_unless_given(tmp_path):
    assert recipe.chosen_objective(tmp_path, None) == "few_shot_loss"
    (tmp_path / "summary.json").write_text(json.dumps({"best": "shot_error"}))
    assert recipe.chosen_objective(tmp_path, None) == "shot_error"
    assert recipe.chosen_objective(tmp_path, "answer_loss") == "answer_loss"


def test_the_server_scorer_records_each_job_result_in_its_bundle(tiny_student, data_dir, tmp_path, monkeypatch):
    bundles = {"residual": _bundle(tmp_path / "residual", tiny_student, ["all_data", "addsub", "gsm8k"], "all_data"),
               "default": _bundle(tmp_path / "default", tiny_student, ["addsub", "gsm8k"])}
    residual_out, out = tmp_path / "res-out", tmp_path / "out"
    write_jsonl(residual_out / "data" / "addsub.val.jsonl", load_task("addsub", "train", data_dir)[:8])
    sent = []

    def fake_job(config, shots, priority=None):
        sent.append((config.server, config.mode, config.objective, len(shots), priority))
        return {"objective": config.objective, "mode": config.mode,
                "result": {"weights": {"addsub": 0.75, "gsm8k": 0.25}, "loss": 1.5, "trace": [], "seconds": 3.0}}

    monkeypatch.setattr(recipe, "compose_on_server", fake_job)
    search = recipe.search_on_server({str(bundles["residual"]): "http://127.0.0.1:1"})
    done = recipe.run(["residual-linear"], ["addsub"], bundles, residual_out, out, "answer_loss", search=search)
    assert sent == [("http://127.0.0.1:1", "linear", "answer_loss", recipe.SHOTS, "shared")]
    assert done[0]["weights"] == {"addsub": 0.75, "gsm8k": 0.25}
    recorded = load_bundle(bundles["residual"], student=tiny_student, strict=True).compositions["addsub-seen-linear"]
    assert recorded.mode == "linear" and recorded.weights == {"addsub": 0.75, "gsm8k": 0.25}
    report = json.loads((out / "reports" / "residual-addsub-seen-linear.json").read_text())
    assert report["scorer"] == "server" and report["shared"] == "all_data" and report["loss"] == 1.5
    assert recipe.missing(["residual-linear", "default-exact"], ["addsub"], bundles) == [
        ("default-exact", bundles["default"], "addsub-seen-exact", "exact")]
