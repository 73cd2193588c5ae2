"""The pipeline: config checks, the tiny pipeline end to end (vLLM eval), and distillation as Ray tasks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mode_cotd.bundle import load_bundle
from mode_cotd.errors import ConfigError
from mode_cotd.paths import REPO_ROOT
from training.pipeline import load_pipeline_config, plan, run_pipeline

TINY = REPO_ROOT / "training" / "configs" / "tiny.yaml"
DEFAULT = REPO_ROOT / "training" / "configs" / "default.yaml"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_shipped_configs_plan_every_stage(tmp_path):
    for path in (TINY, DEFAULT):
        p = plan(load_pipeline_config(path, {"work_dir": str(tmp_path)}), str(path))
        assert [c.task for c in p.distill] == p.seen and [c.task for c in p.compose] == p.unseen
        assert p.eval.tasks == p.seen + p.unseen
        assert all(c.bundle == str(tmp_path / "bundle") for c in (*p.distill, p.gate, *p.compose, p.eval))
    default = plan(load_pipeline_config(DEFAULT), str(DEFAULT))
    assert len(default.seen) == 10 and len(default.unseen) == 4
    assert (default.distill[0].r, default.distill[0].lora_alpha, default.compose[0].budget) == (16, 32, 40)


def test_toml_gives_the_same_plan_as_yaml(tmp_path):
    toml = _write(tmp_path / "tiny.toml", """
student = "tiny"
seen_tasks = ["last_letter_concatenation", "single_eq"]
unseen_tasks = ["strategy_qa"]
[distill]
r = 4
max_steps = 4
""")
    p = plan(load_pipeline_config(toml), str(toml))
    assert p.distill[1].task == "single_eq" and p.distill[1].r == 4 and p.distill[1].max_steps == 4
    assert p.distill[0].student.endswith("student")


@pytest.mark.parametrize("text, message", [
    ("studnet: tiny\n", r"unknown keys \['studnet'\]"),
    ("distill: {rank: 4}\n", r"distill: unknown keys \['rank'\]"),
    ("gate: {stepz: 4}\n", r"gate: unknown keys \['stepz'\]"),
    ("gate_e2e: {stepz: 4}\n", r"gate_e2e: unknown keys \['stepz'\]"),
    ("compose: {budgit: 4}\n", r"compose: unknown keys \['budgit'\]"),
    ("eval: {route: [base]}\n", r"eval: unknown keys \['route'\]"),
    ("ray: {gpus: 1}\n", r"ray: unknown keys \['gpus'\]"),
    ("teacher: {sorce: import}\n", r"teacher: unknown keys \['sorce'\]"),
    ("teacher: {source: endpoint, endpoint: {base_url: x, model: m, tempo: 1}}\n", r"endpoint: unknown keys"),
    ("teacher: {source: oracle}\n", "source for '\\*' must be one of"),
    ("distill: {task: gsm8k}\n", r"keys \['task'\] are set by the pipeline"),
    ("stages: [teach]\n", "unknown stages"),
    ("seen_tasks: [nope]\n", "unknown task"),
    ("eval: {routes: [bogus]}\n", "unknown route"),
    ("- a list\n", "invalid config file"),
])
def test_bad_configs_are_refused_before_anything_runs(tmp_path, text, message):
    path = _write(tmp_path / "bad.yaml", f"work_dir: {tmp_path / 'work'}\n{text}")
    with pytest.raises(ConfigError, match=message):
        run_pipeline(load_pipeline_config(path), str(path))
    assert not (tmp_path / "work").exists(), "a refused config must not start any stage"


def test_missing_or_non_mapping_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_pipeline_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_pipeline_config(_write(tmp_path / "list.yaml", "- a\n- b\n"))


@pytest.mark.slow
@pytest.mark.vllm
def test_tiny_pipeline_end_to_end(tmp_path, heavy_lock):
    work = tmp_path / "work"
    command = [sys.executable, "-m", "mode_cotd.cli", "pipeline", str(TINY), "--work-dir", str(work)]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((work / "pipeline.json").read_text())
    assert set(summary["seconds"]) == {"teacher", "distill", "gate", "compose", "eval"}

    bundle = load_bundle(work / "bundle", student=work / "student", strict=True)
    assert sorted(bundle.experts) == ["last_letter_concatenation", "single_eq"]
    assert bundle.gate is not None and "routing_accuracy" in bundle.manifest.gate.report
    assert list(bundle.compositions) == ["strategy_qa"]
    for expert in bundle.experts.values():
        assert json.loads((expert.path / "report.json").read_text())["steps"] == 4
    assert (work / "teacher" / "rationales.report.json").is_file()
    assert (work / "bundle" / "reports" / "gate.json").is_file()
    assert (work / "bundle" / "reports" / "compose_strategy_qa.json").is_file()

    evaluation = json.loads((work / "bundle" / "reports" / "eval" / "eval.json").read_text())
    assert evaluation["route_order"] == ["base", "task", "gate"]
    for route in evaluation["routes"].values():
        assert set(route["tasks"]) == {"last_letter_concatenation", "single_eq", "strategy_qa"}
        assert all(t["n"] == 4 for t in route["tasks"].values())
        assert 0.0 <= route["seen_average"] <= 1.0 and 0.0 <= route["unseen_average"] <= 1.0
    assert set(evaluation["routes"]["task"]["adapters"]) >= {"expert-last_letter_concatenation", "expert-single_eq"}


@pytest.mark.slow
@pytest.mark.ray
def test_experts_as_ray_tasks_match_in_process_training(tmp_path, data_dir, heavy_lock):
    import ray

    yaml = _write(tmp_path / "ray.yaml", TINY.read_text().replace("enabled: false", "enabled: true\n  num_cpus: 1"))
    overrides = {"work_dir": str(tmp_path / "ray"), "stages": ["teacher", "distill"], "data_dir": str(data_dir)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_pipeline(load_pipeline_config(yaml, overrides), str(yaml))
    finally:
        ray.shutdown()
    local = load_pipeline_config(TINY, {**overrides, "work_dir": str(tmp_path / "local")})
    run_pipeline(local, str(TINY))

    assert set(summary["stages"]["distill"]) == {"last_letter_concatenation", "single_eq"}
    remote = load_bundle(tmp_path / "ray" / "bundle", student=tmp_path / "ray" / "student", strict=True)
    in_process = load_bundle(tmp_path / "local" / "bundle", strict=True)
    assert sorted(remote.experts) == sorted(in_process.experts) == ["last_letter_concatenation", "single_eq"]
    for name, entry in remote.experts.items():
        report = json.loads((entry.path / "report.json").read_text())
        assert report["steps"] == 4 and report["task"] == name
        ray_weights, local_weights = entry.load().weights, in_process.experts[name].load().weights
        assert ray_weights.keys() == local_weights.keys()
        for key in ray_weights:
            torch.testing.assert_close(ray_weights[key], local_weights[key], rtol=1e-4, atol=1e-5)
