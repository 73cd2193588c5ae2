"""Few-shot composition on the tiny student: in-place mixing is exact, the search beats uniform weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mode_cotd.adapter import save_adapter
from mode_cotd.bundle import add_expert, create_bundle, load_bundle, read_manifest
from mode_cotd.errors import ConfigError, DataError
from mode_cotd.mixing import compose_exact, merge_linear
from mode_cotd.settings import settings_from_dict
from mode_cotd.student import student_identity
from mode_cotd.tiny import random_adapter
from training.compose import (
    ComposeConfig,
    ExactMixer,
    LinearMixer,
    compose,
    load_shots,
    main,
    mixed_student,
    write_lora,
)
from training.objectives import TokenLoss

TARGET = "strategy_qa"


@pytest.fixture(scope="module")
def distilled_bundle(tmp_path_factory, tiny_student, data_dir) -> Path:
    """A bundle with two experts briefly distilled on the tiny student: one on the target's train data."""
    from training.distill import DistillConfig, distill

    root = tmp_path_factory.mktemp("compose") / "bundle"
    for task in (TARGET, "last_letter_concatenation"):
        distill(DistillConfig(task=task, student=str(tiny_student), data_dir=str(data_dir), subsample=16, r=4,
                              lora_alpha=8, lr=1e-2, max_steps=12, batch_size=4, max_length=256,
                              checkpoint_every=1000, work_dir=str(root.parent / f"work-{task}"), bundle=str(root),
                              progress=False, lora_dropout=0.0))
    return root


def _config(bundle: Path, student: Path, data_dir: Path, **overrides) -> ComposeConfig:
    settings = {"task": TARGET, "bundle": str(bundle), "student": str(student), "data_dir": str(data_dir),
                "budget": 20, "max_length": 256}
    settings.update(overrides)
    return settings_from_dict(ComposeConfig, settings, "test")


def test_exact_mixer_gives_compose_exact(tiny_student):
    adapters = [random_adapter(tiny_student, r=r, lora_alpha=alpha, seed=s) for s, r, alpha in ((1, 4, 8), (2, 2, 5))]
    weights = [0.7, -1.3]
    expected = compose_exact(adapters, weights).modules()
    mixer = ExactMixer(adapters)
    got = mixer.tensors(weights)
    assert set(got) == set(expected)
    for path, (a, b) in expected.items():
        assert got[path][0] is None
        assert torch.equal(mixer.initial().modules()[path][0], a)
        torch.testing.assert_close(got[path][1], b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["exact", "linear"])
def test_in_place_loss_equals_a_freshly_loaded_mixture(tmp_path, tiny_student, data_dir, mode):
    adapters = [random_adapter(tiny_student, r=4, seed=s, std=0.3) for s in (1, 2, 3)]
    mixer = ExactMixer(adapters) if mode == "exact" else LinearMixer(adapters)
    shots, _ = load_shots(_config(tmp_path, tiny_student, data_dir))
    model, tokenizer = mixed_student(tiny_student, mixer.initial(), "float32", "cpu")
    loss = TokenLoss(model, tokenizer, shots, 256, 2, "cpu")
    weights = [1.5, -0.4, 0.9]
    write_lora(model, mixer.tensors(weights))
    in_place = loss()

    mixture = compose_exact(adapters, weights) if mode == "exact" else merge_linear(adapters, weights)
    fresh_model, _ = mixed_student(tiny_student, mixture, "float32", "cpu")
    assert in_place == pytest.approx(TokenLoss(fresh_model, tokenizer, shots, 256, 5, "cpu")(), rel=1e-5)
    write_lora(model, mixer.tensors([0.0, 0.0, 0.0]))
    assert loss() != pytest.approx(in_place, rel=1e-3), "the weights must change the loss"


def test_found_weights_lower_the_few_shot_loss(distilled_bundle, tiny_student, data_dir):
    result = compose(_config(distilled_bundle, tiny_student, data_dir))
    report = result.report
    assert report["found"]["loss"] < report["uniform"]["loss"], report
    assert report["found"]["objective"] <= min(h["objective"] for h in report["history"])
    assert len(report["history"]) == 20 and report["shots"]["n"] == 5
    assert all(-3.0 <= w <= 3.0 for w in result.weights.values())
    bundle = load_bundle(distilled_bundle, student=tiny_student, strict=True)
    assert bundle.compositions[TARGET].weights == result.weights
    assert bundle.compositions[TARGET].mode == "exact"
    assert json.loads(result.report_path.read_text())["found"]["loss"] == report["found"]["loss"]


def test_linear_mode_and_command_line(distilled_bundle, tiny_student, data_dir, capsys):
    code = main(["--task", TARGET, "--bundle", str(distilled_bundle), "--student", str(tiny_student),
                 "--data-dir", str(data_dir), "--mode", "linear", "--budget", "6", "--name", "sqa_linear",
                 "--max-length", "256"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["found_loss"] <= out["uniform_loss"] + 0.05 * 1.5  # never worse on the objective
    record = read_manifest(distilled_bundle).compositions["sqa_linear"]
    assert record.mode == "linear" and record.task == TARGET


def test_coin_flip_uses_five_fixed_train_examples(tmp_path, tiny_student, data_dir):
    config = _config(tmp_path, tiny_student, data_dir, task="coin_flip")
    first, source = load_shots(config)
    again, _ = load_shots(_config(tmp_path, tiny_student, data_dir, task="coin_flip", seed=7))
    assert len(first) == 5 and [e.input for e in first] == [e.input for e in again]
    assert "coin_flip_train.json" in source


def test_bad_input_leaves_no_composition(tmp_path, tiny_student, data_dir):
    root = tmp_path / "bundle"
    create_bundle(root, student_identity(tiny_student))
    add_expert(root, "a", random_adapter(tiny_student, r=4, seed=1), "gsm8k")
    add_expert(root, "b", random_adapter(tiny_student, r=2, seed=2), "svamp")
    with pytest.raises(ConfigError, match="one rank"):
        compose(_config(root, tiny_student, data_dir, mode="linear"))
    with pytest.raises(ConfigError, match="not usable"):
        compose(_config(root, tiny_student, data_dir, experts=["a", "zz"]))
    empty = tmp_path / "shots.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="shots.jsonl"):
        compose(_config(root, tiny_student, data_dir, shots_file=str(empty)))
    with pytest.raises(ConfigError, match="unknown keys"):
        settings_from_dict(ComposeConfig, {"task": TARGET, "budgett": 3}, "test")
    with pytest.raises(ConfigError, match="unknown task"):
        _config(root, tiny_student, data_dir, task="nope")
    assert read_manifest(root).compositions == {}
    save_adapter(random_adapter(tiny_student, r=4, seed=3), tmp_path / "unused")  # the bundle is still writable


@pytest.mark.parametrize("objective", ["answer_loss", "shot_error"])
def test_other_objectives_drive_the_search_and_are_reported(distilled_bundle, tiny_student, data_dir, tmp_path,
                                                            objective):
    result = compose(_config(distilled_bundle, tiny_student, data_dir, objective=objective, budget=3,
                             max_length=1024, name=f"sqa_{objective}", report=str(tmp_path / "r.json")))
    report = result.report
    assert report["objective"] == objective and len(report["history"]) == 3
    assert report["found"]["objective"] <= report["uniform"]["objective"]
    if objective == "shot_error":
        assert all(0 <= h["loss"] <= 1 for h in report["history"])


def test_over_a_shared_adapter_the_search_weighs_the_others_on_top_of_it(distilled_bundle, tiny_student, data_dir,
                                                                         tmp_path):
    import shutil

    from mode_cotd.bundle import add_expert, set_shared
    from mode_cotd.mixing import mix

    root = tmp_path / "shared"
    shutil.copytree(distilled_bundle, root)
    add_expert(root, "all_data", random_adapter(tiny_student, r=4, seed=9, std=0.3), "all_data")
    set_shared(root, "all_data")
    result = compose(_config(root, tiny_student, data_dir, budget=3, name="sqa_over", report=str(tmp_path / "r.json")))
    report = result.report
    assert report["shared"] == "all_data" and "all_data" not in result.weights
    bundle = load_bundle(root, student=tiny_student, strict=True)
    adapters = [bundle.experts[e].load() for e in report["experts"]]
    served = mix(adapters, [result.weights[e] for e in report["experts"]], "exact", bundle.experts["all_data"].load())
    model, tokenizer = mixed_student(tiny_student, served, "float32", "cpu")  # what serving computes
    shots, _ = load_shots(_config(root, tiny_student, data_dir))
    assert report["found"]["loss"] == pytest.approx(TokenLoss(model, tokenizer, shots, 256, 5, "cpu")(), rel=1e-4)
    with pytest.raises(ConfigError, match="shared adapter"):
        compose(_config(root, tiny_student, data_dir, budget=1, experts=["all_data", TARGET]))
