"""training.recipes.powered_table: its units, and the table assembled from unit files (no engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mode_cotd.tasks import SEEN_TASKS, UNSEEN_TASKS
from training.paired_bootstrap import paired_interval
from training.recipes.accuracy_table import unit_path
from training.recipes.powered_table import PoweredConfig, assemble, markdown, units


def test_units_follow_the_columns_and_skip_missing_bundles():
    config = PoweredConfig()
    got = units(config, {"default", "all_data"})
    assert {u.label for u in got} == {"all_data", "base", "gate", "seen comp., default exact",
                                      "seen comp., default linear"}
    assert len(got) == 3 * (len(SEEN_TASKS) + len(UNSEEN_TASKS)) + 2 * len(SEEN_TASKS)
    seen = [u for u in got if u.label == "seen comp., default linear"]
    assert [u.route for u in seen] == [f"composition:{t}-seen-linear" for t in SEEN_TASKS]
    residual = [u for u in units(config, {"residual"}) if u.label == "shared+own residual"]
    assert [u.task for u in residual] == list(SEEN_TASKS)
    assert json.loads(residual[0].route.split(":", 1)[1]) == {"all_data": 1.0, residual[0].task: 1.0}
    assert units(PoweredConfig(columns=["base"], tasks=["addsub"]), {"default"})[0].slug == "base__addsub"
    with pytest.raises(SystemExit, match="unknown columns"):
        units(PoweredConfig(columns=["nope"]), {"default"})


def _write(config, label, task, flags):
    unit = next(u for u in units(PoweredConfig(), {"default", "all_data", "residual"})
                if u.label == label and u.task == task)
    path = unit_path(Path(config.out), unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"label": label, "task": task, "n": len(flags), "correct_flags": flags}))


def test_assemble_averages_and_compares_on_the_same_prompts(tmp_path):
    config = PoweredConfig(out=str(tmp_path), resamples=200)
    for i, task in enumerate([*SEEN_TASKS, *UNSEEN_TASKS]):
        _write(config, "all_data", task, [1, 0, 0, 1])
        _write(config, "base", task, [0, 0, 0, 0])
        _write(config, "gate", task, [1, 1, 0, i % 2])
    report = assemble(config)
    gate = report["columns"]["gate"]
    seen_gate = sum(100 * (2 + i % 2) / 4 for i in range(len(SEEN_TASKS))) / len(SEEN_TASKS)
    assert gate["seen_average"] == pytest.approx(seen_gate)
    expected = paired_interval({t: [1, 1, 0, i % 2] for i, t in enumerate(SEEN_TASKS)},
                               {t: [1, 0, 0, 1] for t in SEEN_TASKS}, 200, 0)
    assert gate["seen_vs_all_data"]["diff"] == pytest.approx(expected.diff)
    assert gate["seen_vs_all_data"]["low"] == pytest.approx(expected.low)
    assert "seen_vs_all_data" not in report["columns"]["all_data"]
    text = (tmp_path / "table.md").read_text()
    assert text == markdown(report) and "seen: Δ vs all_data (95% CI)" in text


def test_a_column_with_missing_tasks_has_no_average_yet(tmp_path):
    config = PoweredConfig(out=str(tmp_path), resamples=50)
    _write(config, "all_data", SEEN_TASKS[0], [1, 0])
    report = assemble(config)
    assert report["columns"]["all_data"]["seen_average"] is None
