"""The breakdown of a gate column against all_data, from synthetic unit files."""

import json

import pytest

from training.recipes.powered_breakdown import breakdown, main, unit_file


def _unit(out, column, task, rows):
    """rows: (index, experts, correct) per example."""
    path = unit_file(out, column, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"label": column, "task": task, "correct_flags": [c for _, _, c in rows],
                                "examples": [{"index": i, "experts": e} for i, e, _ in rows]}))


def test_counts_per_part_are_paired_by_index(tmp_path):
    shared, mixed = {"all_data": 1.0}, {"all_data": 1.0, "addsub": 0.6, "svamp": 0.4}
    _unit(tmp_path, "shared+gate residual", "addsub", [(0, shared, 1), (1, mixed, 1), (2, mixed, 0), (3, mixed, 1)])
    _unit(tmp_path, "all_data", "addsub", [(3, shared, 0), (2, shared, 1), (1, shared, 1), (0, shared, 1)])
    report = breakdown(tmp_path, "shared+gate residual")
    parts = report["tasks"]["addsub"]
    assert parts["shared only"] == {"n": 1, "route": 1, "all_data": 1, "gained": 0, "lost": 0}
    assert parts["mixed"] == {"n": 3, "route": 2, "all_data": 2, "gained": 1, "lost": 1}
    assert report["groups"]["seen"]["mixed"]["n"] == 3 and report["groups"]["unseen"]["mixed"]["n"] == 0


def test_unpaired_prompts_and_missing_units_are_named(tmp_path):
    _unit(tmp_path, "shared+gate residual", "svamp", [(5, {"all_data": 1.0}, 1)])
    _unit(tmp_path, "all_data", "svamp", [(4, {"all_data": 1.0}, 1)])
    with pytest.raises(SystemExit, match="example 5 .* no all_data counterpart"):
        breakdown(tmp_path, "shared+gate residual")
    with pytest.raises(SystemExit, match="no task has unit files"):
        main(["--out", str(tmp_path), "--column", "gate"])
