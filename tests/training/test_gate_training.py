"""Gate training on the tiny student: real prompts, held-out accuracy, report, bundle, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mode_cotd.bundle import add_expert, create_bundle, load_bundle, read_manifest
from mode_cotd.errors import ConfigError, DataError
from mode_cotd.settings import settings_from_dict
from mode_cotd.student import student_identity
from mode_cotd.tiny import random_adapter
from training.gate import GateTrainConfig, main, routing_metrics, routing_split, train_gate

TASKS = ("last_letter_concatenation", "tracking_shuffled_objects", "gsm8k")


def _bundle(root: Path, student: Path, tasks=TASKS) -> Path:
    create_bundle(root, student_identity(student))
    for seed, task in enumerate(tasks):
        add_expert(root, task, random_adapter(student, r=4, seed=seed), task)
    return root


def _config(bundle: Path, student: Path, data_dir: Path, **overrides) -> GateTrainConfig:
    settings = {"bundle": str(bundle), "student": str(student), "data_dir": str(data_dir), "max_per_task": 150,
                "steps": 300, "hidden_dim": 64, "lr": 3e-3}
    settings.update(overrides)
    return settings_from_dict(GateTrainConfig, settings, "test")


def test_gate_learns_to_route_held_out_prompts(tmp_path, tiny_student, data_dir):
    bundle = _bundle(tmp_path / "bundle", tiny_student)
    result = train_gate(_config(bundle, tiny_student, data_dir))
    report = result.report
    assert report["routing_accuracy"] >= 0.9, report["validation"]
    confusion = report["validation"]["confusion"]
    assert confusion["labels"] == sorted(TASKS)
    matrix = torch.tensor(confusion["matrix"])
    assert matrix.sum().item() == report["validation"]["n"] == sum(c["val"] for c in report["prompts"].values())
    assert matrix.trace().item() / matrix.sum().item() == pytest.approx(report["routing_accuracy"])
    assert report["loss_curve_every_10_steps"][-1] < report["loss_curve_every_10_steps"][0]

    loaded = load_bundle(bundle, student=tiny_student, strict=True)
    assert loaded.gate is not None and loaded.gate.config.experts == sorted(TASKS)
    assert read_manifest(bundle).gate.report["routing_accuracy"] == report["routing_accuracy"]
    assert json.loads(result.report_path.read_text())["routing_accuracy"] == report["routing_accuracy"]
    # the saved gate routes exactly like the trained one
    features = torch.randn(5, loaded.gate.config.feature_dim)
    assert torch.equal(loaded.gate(features).argmax(1), result.gate(features).argmax(1))


def test_an_untrained_gate_scores_near_chance_so_the_metric_can_fail(tmp_path, tiny_student, data_dir):
    from mode_cotd.featurise import make_featuriser
    from mode_cotd.gate import Gate, GateConfig
    from training.gate import featurise

    config = _config(tmp_path, tiny_student, data_dir)
    split = routing_split(list(TASKS), config)
    featuriser = make_featuriser("embedding_mean", tiny_student)
    gate = Gate(GateConfig(experts=list(TASKS), feature_dim=featuriser.feature_dim))
    with torch.no_grad():
        gate.net[-1].weight.zero_()
        gate.net[-1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))  # always routes to the first expert
    metrics = routing_metrics(gate, featurise(featuriser, split.val_prompts), torch.tensor(split.val_labels), list(TASKS))
    assert metrics["per_task"] == {TASKS[0]: 1.0, TASKS[1]: 0.0, TASKS[2]: 0.0}
    assert metrics["balanced_accuracy"] == pytest.approx(1 / 3)


def test_split_is_seeded_disjoint_and_per_task(tiny_student, data_dir, tmp_path):
    config = _config(tmp_path, tiny_student, data_dir, max_per_task=50, val_fraction=0.2)
    a, b = routing_split(list(TASKS), config), routing_split(list(TASKS), config)
    assert a.val_prompts == b.val_prompts and a.train_prompts == b.train_prompts
    assert not set(a.val_prompts) & set(a.train_prompts)
    assert [a.val_labels.count(i) for i in range(3)] == [10, 10, 10]
    other = routing_split(list(TASKS), _config(tmp_path, tiny_student, data_dir, max_per_task=50, seed=1))
    assert other.val_prompts != a.val_prompts


def test_train_files_override_and_bad_input(tmp_path, tiny_student, data_dir):
    bundle = _bundle(tmp_path / "bundle", tiny_student, tasks=("coin_flip", "strategy_qa"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        train_gate(_config(bundle, tiny_student, data_dir, train_files={"coin_flip": str(empty)}))
    with pytest.raises(DataError, match="missing.json"):
        train_gate(_config(bundle, tiny_student, data_dir, train_files={"coin_flip": str(tmp_path / "missing.json")}))
    with pytest.raises(ConfigError, match="not in the bundle"):
        train_gate(_config(bundle, tiny_student, data_dir, experts=["coin_flip", "gsm8k"]))
    with pytest.raises(ConfigError, match=r"unknown keys \['stepz'\]"):
        settings_from_dict(GateTrainConfig, {"stepz": 3}, "test")
    with pytest.raises(ConfigError, match="val_fraction"):
        _config(bundle, tiny_student, data_dir, val_fraction=1.5)
    assert read_manifest(bundle).gate is None, "a failed run must not leave a gate behind"
    add_expert(bundle, "coin_flip_2", random_adapter(tiny_student, r=4, seed=9), "coin_flip")
    with pytest.raises(ConfigError, match="both serve task 'coin_flip'"):
        train_gate(_config(bundle, tiny_student, data_dir))


def test_command_line(tmp_path, tiny_student, data_dir, capsys):
    bundle = _bundle(tmp_path / "bundle", tiny_student, tasks=("last_letter_concatenation", "gsm8k"))
    code = main(["--bundle", str(bundle), "--student", str(tiny_student), "--data-dir", str(data_dir),
                 "--max-per-task", "40", "--steps", "50", "--hidden-dim", "0"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["routing_accuracy"] <= 1.0
    assert (bundle / "reports" / "gate.json").is_file()
    assert load_bundle(bundle, student=tiny_student).gate.config.hidden_dim == 0
