"""Benchmark prompts from the test sets, and the environment a run records."""

from __future__ import annotations

import json
import re

from benchmarks import environment
from benchmarks.prompts import interleave, load_prompts, write_jsonl
from mode_cotd.tasks import ANSWER_CUE, SEEN_TASKS


def test_interleave_takes_tasks_in_turn_and_cycles():
    prompts = interleave({"x": ["x0", "x1"], "y": ["y0"], "z": []}, 5)
    assert [(p.task, p.text) for p in prompts] == [("x", "x0"), ("y", "y0"), ("x", "x1"), ("y", "y0"), ("x", "x0")]
    assert interleave({"x": ["x0"]}, 0) == []


def test_load_prompts_from_the_test_sets(data_dir, tmp_path):
    prompts = load_prompts(25, data_dir=data_dir)
    assert len(prompts) == 25
    assert [p.task for p in prompts[:10]] == list(SEEN_TASKS)
    assert all(p.text.endswith(ANSWER_CUE) for p in prompts)
    assert prompts == load_prompts(25, data_dir=data_dir)
    path = write_jsonl(prompts[:3], tmp_path / "p.jsonl")
    assert [json.loads(line)["prompt"] for line in path.read_text().splitlines()] == [p.text for p in prompts[:3]]


def test_environment_describes_versions_cpu_threads_and_commit():
    env = environment.describe()
    assert env["versions"]["python"] and env["versions"]["torch"]
    assert env["cpu"]["logical_cpus"] >= 1
    assert "OMP_NUM_THREADS" in env["threads"]
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])


def test_git_commit_reads_loose_and_packed_refs(tmp_path):
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "packed-refs").write_text("# pack-refs\n" + "a" * 40 + " refs/heads/main\n")
    assert environment.git_commit(tmp_path) == "a" * 40
    (git / "refs" / "heads" / "main").write_text("b" * 40 + "\n")
    assert environment.git_commit(tmp_path) == "b" * 40
    (git / "HEAD").write_text("c" * 40 + "\n")  # detached
    assert environment.git_commit(tmp_path) == "c" * 40
    assert environment.git_commit(tmp_path / "nowhere") is None
