"""Expert distillation on the tiny student: bundle output, exact resume (also after kill -9), bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mode_cotd.adapter import adapter_from_modules, load_adapter, save_adapter
from mode_cotd.bundle import MANIFEST, load_bundle
from mode_cotd.data import load_task
from mode_cotd.errors import BundleError, ConfigError, DataError
from mode_cotd.format import IGNORE_INDEX
from mode_cotd.mixing import delta_weight
from mode_cotd.student import load_student, resolve_student
from training.checkpoint import checkpoint_dirs
from training.distill import (
    DistillConfig,
    collate,
    distill,
    lr_factor,
    main,
    merge_shared_adapter,
    micro_batch,
)
from training.distill_config import build_parser

TASK = "last_letter_concatenation"


def tiny_config(tiny_student: Path, tmp_path: Path, name: str = "run", **overrides) -> DistillConfig:
    settings = {"task": TASK, "student": str(tiny_student), "subsample": 8, "batch_size": 2, "max_length": 256,
                "r": 4, "lora_alpha": 8, "max_steps": 4, "checkpoint_every": 2, "device": "cpu",
                "work_dir": str(tmp_path / name / "work"), "bundle": str(tmp_path / name / "bundle"), "progress": False}
    settings.update(overrides)
    return DistillConfig.from_dict(settings)


def adapter_tensors(expert_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(expert_dir / "adapter_model.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        assert torch.allclose(tensor, b[key], rtol=0, atol=1e-6), key


# ----------------------------------------------------------------------------- config


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"unknown keys \['learning_rate', 'rank'\]"):
        DistillConfig.from_dict({"task": TASK, "rank": 8, "learning_rate": 1e-3})


@pytest.mark.parametrize("settings, message", [
    ({}, r"missing keys \['task'\]"),
    ({"task": "no_such_task"}, "unknown task"),
    ({"task": TASK, "r": "16"}, "r must be"),
    ({"task": TASK, "r": 0}, "r: invalid value 0"),
    ({"task": TASK, "dtype": "float16"}, "dtype: invalid value"),
    ({"task": TASK, "autocast": "float16"}, "autocast: invalid value"),
    ({"task": TASK, "resume": 1}, "resume must be"),
    ({"task": TASK, "target_modules": ["q_proj", 3]}, "target_modules must be"),
])
def test_bad_config_values_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig.from_dict(settings)


def test_defaults_follow_the_paper_and_target_modules_forms():
    config = DistillConfig.from_dict({"task": TASK})
    assert (config.r, config.lora_alpha, config.lora_dropout, config.lr, config.epochs, config.max_length) == (
        16, 32, 0.1, 5e-4, 5, 512)
    assert config.target_modules == ["q_proj", "v_proj"]
    assert DistillConfig.from_dict({"task": TASK, "target_modules": "all-linear"}).target_modules == "all-linear"
    assert DistillConfig.from_dict({"task": TASK, "target_modules": ["all-linear"]}).target_modules == "all-linear"
    assert DistillConfig.from_dict({"task": TASK, "target_modules": "q_proj,k_proj"}).target_modules == [
        "q_proj", "k_proj"]


def test_help_lists_every_field_with_its_default():
    text = build_parser().format_help()
    for flag in ("--r ", "--lora-alpha", "--target-modules", "--max-steps", "--grad-accum", "--checkpoint-every"):
        assert flag in text
    assert "LoRA rank. (default: 16)" in " ".join(text.split())


# ----------------------------------------------------------------------------- data order and batching


def test_each_epoch_visits_every_example_once_in_a_seeded_order():
    examples = list(range(10))
    epoch0 = [x for m in range(4) for x in micro_batch(examples, m, 3, seed=7)]
    epoch1 = [x for m in range(4, 8) for x in micro_batch(examples, m, 3, seed=7)]
    assert sorted(epoch0) == sorted(epoch1) == examples
    assert epoch0 != epoch1
    assert epoch0 == [x for m in range(4) for x in micro_batch(examples, m, 3, seed=7)]
    assert epoch0 != [x for m in range(4) for x in micro_batch(examples, m, 3, seed=8)]


def test_collate_pads_right_and_masks_padding_out_of_the_loss():
    input_ids, attention_mask, labels = collate([([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8], [8])], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_learning_rate_schedules():
    assert [lr_factor(s, 4, 0, "linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [lr_factor(s, 4, 1, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- training


def test_distill_writes_a_loadable_expert_with_its_report(tiny_student, tmp_path):
    result = distill(tiny_config(tiny_student, tmp_path, grad_accum=2))
    bundle = load_bundle(tmp_path / "run" / "bundle", student=tiny_student)
    entry = bundle.experts[TASK]
    assert entry.path == result.expert_dir
    assert (entry.record.r, entry.record.lora_alpha, entry.record.target_modules) == (4, 8.0, ["q_proj", "v_proj"])
    report = json.loads((result.expert_dir / "report.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    assert len(report["loss_curve"]) == report["steps"] == 4
    assert all(loss > 0 for loss in report["loss_curve"])
    assert report["final_loss"] == report["loss_curve"][-1]
    assert len(report["data"]["data_sha256"]) == 64 and report["data"]["examples"] == 8
    assert report["tokens_per_second"] > 0 and report["train_seconds"] > 0
    assert report["config"]["r"] == 4 and report["device"] == "cpu" and report["dtype"] == "float32"
    assert any(t.abs().sum() > 0 for k, t in adapter_tensors(result.expert_dir).items() if "lora_B" in k)


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tiny_student, tmp_path):
    whole = distill(tiny_config(tiny_student, tmp_path, "whole", max_steps=5))
    stopped = distill(tiny_config(tiny_student, tmp_path, "parts", max_steps=5, stop_after_steps=3))
    assert stopped.expert_dir is None and not (tmp_path / "parts" / "bundle").exists()
    assert [p.name for p in checkpoint_dirs(tmp_path / "parts" / "work")] == ["step-00000003"]
    resumed = distill(tiny_config(tiny_student, tmp_path, "parts", max_steps=5))
    assert resumed.report["resumed_from_step"] == 3
    assert resumed.report["loss_curve"] == whole.report["loss_curve"]
    assert_same_tensors(adapter_tensors(resumed.expert_dir), adapter_tensors(whole.expert_dir))


def test_a_checkpoint_of_another_config_is_refused(tiny_student, tmp_path):
    distill(tiny_config(tiny_student, tmp_path, stop_after_steps=2))
    with pytest.raises(ConfigError, match="checkpoint of another run"):
        distill(tiny_config(tiny_student, tmp_path, lr=1e-3))
    fresh = distill(tiny_config(tiny_student, tmp_path, lr=1e-3, resume=False))
    assert fresh.report["resumed_from_step"] == 0 and fresh.expert_dir is not None
    assert [p.name for p in checkpoint_dirs(tmp_path / "run" / "work")] == ["step-00000004"]


_KILL_SCRIPT = """
import sys
from training.distill import DistillConfig, distill
distill(DistillConfig.from_dict(__import__("json").loads(sys.argv[1])))
"""


def test_kill_9_mid_training_then_resume_gives_the_uninterrupted_result(tiny_student, tmp_path):
    steps = 12
    config = tiny_config(tiny_student, tmp_path, "killed", max_steps=steps, checkpoint_every=2)
    settings = {k: v for k, v in vars(config).items()}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, json.dumps(settings)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).parents[2])
    work = Path(config.work_dir)
    deadline = time.monotonic() + 300
    while not any(int(p.name[5:]) >= 4 for p in checkpoint_dirs(work)):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = int(checkpoint_dirs(work)[-1].name[5:])
    assert killed_at < steps, "the run finished before the kill"
    assert not (Path(config.bundle) / MANIFEST).exists(), "a killed run must not leave an expert"

    resumed = distill(config)
    assert 4 <= resumed.report["resumed_from_step"] < steps
    whole = distill(tiny_config(tiny_student, tmp_path, "whole", max_steps=steps, checkpoint_every=50))
    assert resumed.report["loss_curve"] == pytest.approx(whole.report["loss_curve"], abs=1e-6)
    assert_same_tensors(adapter_tensors(resumed.expert_dir), adapter_tensors(whole.expert_dir))
    assert load_bundle(config.bundle, student=tiny_student).experts[TASK]


def test_bfloat16_on_cpu_and_all_linear(tiny_student, tmp_path):
    result = distill(tiny_config(tiny_student, tmp_path, dtype="bfloat16", target_modules="all-linear", max_steps=2))
    assert result.report["dtype"] == "bfloat16"
    assert all(torch.isfinite(torch.tensor(result.report["loss_curve"])))
    record = load_bundle(result.expert_dir.parents[1], student=tiny_student).experts[TASK].record
    assert record.target_modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])


def test_bfloat16_autocast_trains_float32_parameters_close_to_a_float32_run(tiny_student, tmp_path):
    plain = distill(tiny_config(tiny_student, tmp_path / "plain", max_steps=2))
    mixed = distill(tiny_config(tiny_student, tmp_path / "mixed", max_steps=2, autocast="bfloat16"))
    assert mixed.report["dtype"] == "float32" and mixed.report["config"]["autocast"] == "bfloat16"
    a, b = plain.report["loss_curve"], mixed.report["loss_curve"]
    assert a != b, "autocast changed nothing: the forward pass did not run in bf16"
    assert all(abs(x - y) < 0.05 * x for x, y in zip(a, b)), (a, b)  # bf16 rounding, not another run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bfloat16_with_device_auto_and_exact_resume(tiny_student, tmp_path):
    whole = distill(tiny_config(tiny_student, tmp_path, "whole", device="auto", max_steps=6))
    assert (whole.report["device"], whole.report["dtype"]) == ("cuda", "bfloat16")
    assert all(torch.isfinite(torch.tensor(whole.report["loss_curve"])))
    distill(tiny_config(tiny_student, tmp_path, "parts", device="auto", max_steps=6, stop_after_steps=3))
    resumed = distill(tiny_config(tiny_student, tmp_path, "parts", device="auto", max_steps=6))
    assert resumed.report["resumed_from_step"] == 3
    assert_same_tensors(adapter_tensors(resumed.expert_dir), adapter_tensors(whole.expert_dir))
    assert load_bundle(whole.expert_dir.parents[1], student=tiny_student).experts[TASK]


def test_command_line_with_a_yaml_config_and_overrides(tiny_student, tmp_path, capsys):
    config_file = tmp_path / "distill.yaml"
    config_file.write_text(f"task: {TASK}\nstudent: {tiny_student}\nsubsample: 4\nbatch_size: 2\nmax_length: 256\n"
                           f"r: 2\nmax_steps: 1\ndevice: cpu\nbundle: {tmp_path / 'b'}\nwork_dir: {tmp_path / 'w'}\n")
    assert main(["--config", str(config_file), "--expert", "letters", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["expert"] == "letters" and printed["steps"] == 1
    assert load_bundle(tmp_path / "b").experts["letters"].record.r == 2
    config_file.write_text(f"task: {TASK}\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        main(["--config", str(config_file)])


# ----------------------------------------------------------------------------- bad input


def test_missing_and_empty_data_files(tiny_student, tmp_path):
    with pytest.raises(DataError, match="missing.json: file not found"):
        distill(tiny_config(tiny_student, tmp_path, train_file=str(tmp_path / "missing.json")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        distill(tiny_config(tiny_student, tmp_path, train_file=str(empty)))
    assert not (tmp_path / "run" / "bundle").exists()


def test_no_examples_left_after_filtering(tiny_student, tmp_path, data_dir):
    rationales = tmp_path / "rationales.jsonl"
    other = load_task("addsub", "train", data_dir)[0]
    rationales.write_text(json.dumps({"task": "addsub", "input": other.input, "output": other.output}) + "\n"
                          + json.dumps({"task": TASK, "input": "Q: x\nA:", "output": "no rationale"}) + "\n")
    with pytest.raises(DataError, match=r"no examples of task 'last_letter_concatenation' left after filtering.*"
                                        r"'other_tasks': 1, 'without_rationale': 1"):
        distill(tiny_config(tiny_student, tmp_path, train_file=str(rationales)))
    with pytest.raises(DataError, match="'prompt_too_long': 8"):
        distill(tiny_config(tiny_student, tmp_path, max_length=20))
    assert not (tmp_path / "run" / "bundle").exists()


def test_a_target_module_the_student_lacks_lists_the_valid_ones(tiny_student, tmp_path):
    with pytest.raises(ConfigError, match=r"\['c_attn'\] are not in the student; valid: \['down_proj', 'gate_proj', "
                                          r"'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"):
        distill(tiny_config(tiny_student, tmp_path, target_modules=["q_proj", "c_attn"]))
    assert not Path(tmp_path / "run" / "work").exists()


def test_a_bundle_of_another_student_is_refused(tiny_student, tmp_path):
    from mode_cotd.bundle import create_bundle

    create_bundle(tmp_path / "run" / "bundle", {"name": "other", "config_sha256": "0" * 64})
    with pytest.raises(BundleError, match="bundle is for student 'other'"):
        distill(tiny_config(tiny_student, tmp_path, max_steps=1))
    assert not (tmp_path / "run" / "bundle" / "experts").exists()


# ----------------------------------------------------------------------------- the real student


@pytest.mark.slow
@pytest.mark.real_student
def test_real_student_loss_goes_down_on_last_letter_concatenation(heavy_lock, tmp_path):
    config = DistillConfig.from_dict({
        "task": TASK, "max_steps": 30, "batch_size": 4, "max_length": 256, "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "work_dir": str(tmp_path / "work"), "bundle": str(tmp_path / "bundle"), "progress": False})
    started = time.perf_counter()
    result = distill(config)
    curve = result.report["loss_curve"]
    print(f"\nloss curve ({len(curve)} steps, {time.perf_counter() - started:.0f} s, "
          f"{result.report['tokens_per_second']:.0f} tokens/s):")
    print(" ".join(f"{loss:.3f}" for loss in curve))
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    print(f"mean of first 5: {first:.4f}, mean of last 5: {last:.4f}")
    assert len(curve) == 30
    assert last < first
    assert load_bundle(tmp_path / "bundle", student=resolve_student()).experts[TASK]


# ----------------------------------------------------------------------------- residual over a shared adapter


def _shared_adapter(tiny_student: Path, folder: Path) -> Path:
    """A LoRA on q_proj/v_proj of the tiny student with random A and B (so merging it changes the weights)."""
    model, _ = load_student(tiny_student)
    torch.manual_seed(3)
    modules = {}
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            modules[f"base_model.model.{name}"] = (torch.randn(4, module.in_features) * 0.1,
                                                    torch.randn(module.out_features, 4) * 0.1)
    return save_adapter(adapter_from_modules(modules, r=4, lora_alpha=8.0), folder)


def test_merging_the_shared_adapter_adds_its_delta_to_the_weights(tiny_student, tmp_path):
    folder = _shared_adapter(tiny_student, tmp_path / "shared")
    model, _ = load_student(tiny_student)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = merge_shared_adapter(model, folder)
    adapter = load_adapter(folder)
    changed = 0
    for path in adapter.modules():
        weight = path.removeprefix("base_model.model.") + ".weight"
        expected = before[weight] + delta_weight(adapter, path)  # W + s·B·A
        torch.testing.assert_close(dict(model.named_parameters())[weight].detach(), expected, rtol=0, atol=1e-5)
        changed += 1
    assert changed == 4  # 2 layers x (q_proj, v_proj)
    untouched = [n for n in before if "k_proj" in n]
    assert untouched and all(torch.equal(before[n], dict(model.named_parameters())[n]) for n in untouched)
    assert not any(p.requires_grad for p in model.parameters())
    assert set(record["files"]) >= {"adapter_config.json", "adapter_model.safetensors"}


def test_a_residual_run_records_its_shared_adapter_and_trains_another_expert(tiny_student, tmp_path):
    folder = _shared_adapter(tiny_student, tmp_path / "shared")
    plain = distill(tiny_config(tiny_student, tmp_path, "plain", max_steps=2))
    residual = distill(tiny_config(tiny_student, tmp_path, "residual", max_steps=2, shared_adapter=str(folder)))
    assert plain.report["shared_adapter"] is None
    assert residual.report["shared_adapter"]["path"] == str(folder)
    assert residual.report["fingerprint"] != plain.report["fingerprint"]
    assert residual.report["loss_curve"][0] != pytest.approx(plain.report["loss_curve"][0])  # another base
    load_bundle(tmp_path / "residual" / "bundle", student=tiny_student)  # the expert fits the bare student


def test_a_shared_adapter_that_is_no_lora_folder_is_refused(tiny_student, tmp_path):
    (tmp_path / "not-lora").mkdir()
    with pytest.raises(BundleError):
        distill(tiny_config(tiny_student, tmp_path, shared_adapter=str(tmp_path / "not-lora")))
