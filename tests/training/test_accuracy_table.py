"""The accuracy-table recipe: its units, their slugs, and the table assembled from unit files."""

import json

import pytest

from training.recipes.accuracy_table import Unit, all_units, assemble, unit_path

SEEN = ("addsub", "last_letter_concatenation")
UNSEEN = ("coin_flip",)


def test_units_cover_every_route_once_in_priority_order():
    units = all_units(SEEN, UNSEEN, list(SEEN), ["coin_flip", "coin_flip-linear"])
    chosen = all_units(SEEN, UNSEEN, list(SEEN), [], {"coin_flip": "last_letter_concatenation"})
    assert [(u.route, u.task) for u in chosen[-2:]] == [("expert:last_letter_concatenation", "coin_flip"),
                                                         ("expert:addsub", "coin_flip")]
    labels = [(u.label, u.task) for u in units]
    assert len(labels) == len(set(labels))
    assert labels[:3] == [("base", "addsub"), ("base", "last_letter_concatenation"), ("base", "coin_flip")]
    assert ("expert:addsub", "addsub") in labels and ("expert:addsub", "last_letter_concatenation") not in labels
    assert ("composition:coin_flip", "coin_flip") in labels and ("composition:coin_flip-linear", "coin_flip") in labels
    assert ("all_data:expert:all_data", "coin_flip") in labels
    # every expert on every unseen task (the best single expert), last
    assert labels[-2:] == [("expert:addsub", "coin_flip"), ("expert:last_letter_concatenation", "coin_flip")]


def test_slug_is_a_safe_file_name():
    assert Unit('mixture:{"a": 0.5}', "addsub").slug == "mixture_a_0.5___addsub"
    assert Unit("expert:all_data", "svamp", bundle="all_data").slug == "all_data_expert_all_data__svamp"


def _write(out, unit, correct, n=4, experts=None):
    examples = [{"index": i, "gold": "1", "prediction": "", "adapter": None,
                 "experts": (experts[i] if experts else {})} for i in range(n)]
    record = {"route": unit.route, "bundle": unit.bundle, "label": unit.label, "task": unit.task,
              "accuracy": correct / n, "n": n, "correct": correct, "too_long": 0, "seen": unit.task in SEEN,
              "student": {"name": "s"}, "settings": {"max_examples": n}, "examples": examples}
    path = unit_path(out, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_assemble_computes_averages_best_expert_and_gate_routing(tmp_path, monkeypatch):
    from mode_cotd import tasks

    monkeypatch.setattr(tasks, "SEEN_TASKS", SEEN)
    monkeypatch.setattr(tasks, "UNSEEN_TASKS", UNSEEN)
    _write(tmp_path, Unit("base", "addsub"), 0)
    _write(tmp_path, Unit("base", "last_letter_concatenation"), 1)
    _write(tmp_path, Unit("expert:addsub", "addsub"), 2)
    _write(tmp_path, Unit("expert:last_letter_concatenation", "last_letter_concatenation"), 4)
    _write(tmp_path, Unit("expert:addsub", "coin_flip"), 1)
    _write(tmp_path, Unit("expert:last_letter_concatenation", "coin_flip"), 3)
    _write(tmp_path, Unit("gate", "addsub"), 2, experts=[{"addsub": 0.6, "svamp": 0.4}] * 3 + [{"svamp": 1.0}])
    report = assemble(tmp_path)
    columns = report["columns"]
    assert columns["base"]["seen_average"] == pytest.approx((0 + 0.25) / 2)
    assert columns["oracle (own expert / exact composition)"]["seen_average"] == pytest.approx((0.5 + 1.0) / 2)
    assert report["best_single_expert"]["coin_flip"]["expert"] == "last_letter_concatenation"
    assert columns["best single expert (on test)"]["unseen_average"] == pytest.approx(0.75)
    assert report["gate_routing"]["accuracy"] == pytest.approx(0.75)
    table = (tmp_path / "table.md").read_text()
    assert "| addsub (seen) | 4 |" in table and "**seen average**" in table
