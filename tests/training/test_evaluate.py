"""Routes -> adapter folders, scoring and reports (fake generator), and the real thing through vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mode_cotd.adapter import load_adapter
from mode_cotd.bundle import add_composition, add_expert, create_bundle, load_bundle, set_gate, set_shared
from mode_cotd.errors import ConfigError
from mode_cotd.mixing import compose_exact, merge_linear
from mode_cotd.settings import settings_from_dict
from mode_cotd.student import student_identity
from mode_cotd.tasks import score
from mode_cotd.tiny import random_adapter, random_gate
from training.evaluate import EvalConfig, eval_items, evaluate, markdown_table
from training.gate import GateTrainConfig, train_gate
from training.routes import RoutePlanner, RouteSpec, parse_route

SEEN, UNSEEN = "last_letter_concatenation", "coin_flip"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_student, data_dir) -> Path:
    """Three random experts (one per task), a gate over them, and a composition for strategy_qa."""
    root = tmp_path_factory.mktemp("eval") / "bundle"
    create_bundle(root, student_identity(tiny_student))
    for seed, task in enumerate((SEEN, UNSEEN, "gsm8k")):
        add_expert(root, task, random_adapter(tiny_student, r=4, seed=seed, std=0.3), task)
    train_gate(GateTrainConfig(bundle=str(root), student=str(tiny_student), data_dir=str(data_dir),
                               max_per_task=60, steps=60, hidden_dim=16))
    add_composition(root, "strategy_qa", {UNSEEN: 1.25, "gsm8k": -0.5}, "exact", "strategy_qa")
    return root


def _planner(bundle: Path, student: Path, cache: Path) -> RoutePlanner:
    return RoutePlanner(load_bundle(bundle, student=student), student, cache)


def test_parse_route():
    assert parse_route("base") == RouteSpec("base")
    assert parse_route("expert:gsm8k") == RouteSpec("expert", name="gsm8k")
    assert parse_route("composition:x").label == "composition:x"
    mixture = parse_route('mixture:{"b": 0.5, "a": -1}')
    assert mixture.weights == (("a", -1), ("b", 0.5)) and mixture.label == 'mixture:{"a": -1, "b": 0.5}'
    for bad in ("experts:a", "expert:", "mixture:{oops", "mixture:[1]", "gate:x", ""):
        with pytest.raises(ConfigError):
            parse_route(bad)


def test_plans_build_exact_composites_once(bundle, tiny_student, tmp_path):
    planner = _planner(bundle, tiny_student, tmp_path / "cache")
    assert planner.plan(RouteSpec("base"), ["p"], [SEEN]) == [None]
    (expert,) = planner.plan(parse_route(f"expert:{SEEN}"), ["p"], [SEEN])
    assert expert.path == bundle / "experts" / SEEN and expert.rank == 4

    (composite,) = planner.plan(parse_route("composition:strategy_qa"), ["p"], ["strategy_qa"])
    experts = load_bundle(bundle).experts
    expected = compose_exact([experts[UNSEEN].load(), experts["gsm8k"].load()], [1.25, -0.5])
    built = load_adapter(composite.path)
    assert built.r == 8 == composite.rank and composite.path.parent == tmp_path / "cache"
    for path, (a, b) in expected.modules().items():
        torch.testing.assert_close(built.modules()[path][1] @ built.modules()[path][0], b @ a)

    again = _planner(bundle, tiny_student, tmp_path / "cache")
    (mixture,) = again.plan(parse_route(f'mixture:{{"{UNSEEN}": 1.25, "gsm8k": -0.5}}'), ["p"], [SEEN])
    assert mixture.path == composite.path, "equal mixtures share one folder"
    (single,) = again.plan(parse_route(f'mixture:{{"{SEEN}": 1.0}}'), ["p"], [SEEN])
    assert single.path == expert.path, "one expert at weight 1 is served from its own folder"

    (composite.path / "adapter_model.safetensors").write_bytes(b"garbage")
    rebuilt = _planner(bundle, tiny_student, tmp_path / "cache").composition("strategy_qa")
    assert load_adapter(rebuilt.path).r == 8, "a corrupt cached folder is rebuilt, never handed to vLLM"


def test_adapters_over_the_rank_limit_are_compressed(bundle, tiny_student, tmp_path):
    planner = RoutePlanner(load_bundle(bundle, student=tiny_student), tiny_student, tmp_path / "cache", max_rank=2)
    (composite,) = planner.plan(parse_route("composition:strategy_qa"), ["p"], ["strategy_qa"])
    (expert,) = planner.plan(parse_route(f"expert:{SEEN}"), ["p"], [SEEN])
    assert composite.rank == expert.rank == 2 == load_adapter(expert.path).r
    assert expert.path.parent == tmp_path / "cache", "an expert over the limit is served from a compressed copy"
    assert len(planner.compressions) == 2 and all(0 < e < 1 for e in planner.compressions.values())


def test_gate_and_task_routes(bundle, tiny_student, tmp_path, data_dir):
    planner = _planner(bundle, tiny_student, tmp_path / "cache")
    items = eval_items([SEEN, UNSEEN, "strategy_qa"], str(data_dir), 4, 0)
    prompts, tasks = [i.prompt for i in items], [i.task for i in items]
    gate = planner.plan(RouteSpec("gate"), prompts, tasks)
    keys = load_bundle(bundle).gate.config
    assert len(gate) == 12 and all(c is not None for c in gate)
    assert all(len(c.experts) <= keys.top_k and abs(sum(w for _, w in c.experts) - 1) < 1e-9 for c in gate)
    by_task = planner.plan(RouteSpec("task"), prompts, tasks)
    assert [c.name for c in by_task[:4]] == [f"expert-{SEEN}"] * 4
    assert [c.name for c in by_task[4:8]] == [f"expert-{UNSEEN}"] * 4
    assert all(c.name.startswith("composite-exact-") for c in by_task[8:])
    with pytest.raises(ConfigError, match="neither an expert nor a composition"):
        planner.plan(RouteSpec("task"), ["p"], ["reclor"])
    with pytest.raises(ConfigError, match="no such expert"):
        planner.plan(parse_route("expert:nope"), ["p"], [SEEN])
    with pytest.raises(ConfigError, match="unknown expert"):
        planner.plan(parse_route('mixture:{"nope": 1}'), ["p"], [SEEN])
    with pytest.raises(ConfigError, match="needs a bundle"):
        RoutePlanner(None, tiny_student, tmp_path).plan(RouteSpec("gate"), ["p"], [SEEN])


def test_scores_and_reports_with_a_fake_generator(bundle, tiny_student, tmp_path, data_dir):
    config = settings_from_dict(EvalConfig, {
        "bundle": str(bundle), "student": str(tiny_student), "data_dir": str(data_dir), "tasks": [SEEN, UNSEEN],
        "routes": ["base", f"expert:{SEEN}"], "max_examples": 5, "out_dir": str(tmp_path / "out")}, "test")
    gold = {i.prompt: i.gold for i in eval_items([SEEN, UNSEEN], str(data_dir), 5, 0)}
    calls = []

    def fake(prompts, choices):
        calls.append([c.name if c else None for c in choices])
        return [f"reasoning\n\n-->\n\n{gold[p]} END" if c else "???" for p, c in zip(prompts, choices)]

    result = evaluate(config, generator=fake)
    routes = result.report["routes"]
    assert routes["base"]["seen_average"] == 0.0 and routes["base"]["unseen_average"] == 0.0
    assert routes[f"expert:{SEEN}"]["tasks"][SEEN] == {"accuracy": 1.0, "n": 5, "correct": 5, "seen": True,
                                                       "too_long": 0}
    assert routes[f"expert:{SEEN}"]["average"] == 1.0
    assert calls == [[None] * 10, [f"expert-{SEEN}"] * 10]
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert written["routes"] == json.loads(json.dumps(routes))
    predictions = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 20
    table = (tmp_path / "out" / "eval.md").read_text()
    assert f"| {SEEN} | yes | 5 | 0.0 | 100.0 |" in table and "| **unseen average** | | | 0.0 | 100.0 |" in table


def test_markdown_marks_missing_averages():
    results = {"base": {"tasks": {SEEN: {"accuracy": 0.5, "n": 2}}, "seen_average": 0.5,
                        "unseen_average": None, "average": 0.5}}
    assert "| **unseen average** | | | – |" in markdown_table(results, [SEEN])


def test_bad_eval_config(tiny_student):
    with pytest.raises(ConfigError, match="unknown keys"):
        settings_from_dict(EvalConfig, {"route": ["base"]}, "test")
    with pytest.raises(ConfigError, match="unknown route"):
        settings_from_dict(EvalConfig, {"routes": ["bogus"]}, "test")
    with pytest.raises(ConfigError, match="unknown task"):
        settings_from_dict(EvalConfig, {"tasks": ["nope"]}, "test")


@pytest.mark.slow
@pytest.mark.vllm
def test_every_route_through_vllm(bundle, tiny_student, tmp_path, data_dir, heavy_lock):
    out = tmp_path / "eval"
    routes = ["base", f"expert:{SEEN}", "gate", f'mixture:{{"{SEEN}": 0.5, "gsm8k": 0.5}}',
              "composition:strategy_qa", "task"]
    command = [sys.executable, "-m", "mode_cotd.cli", "eval", "--bundle", str(bundle), "--student", str(tiny_student),
               "--data-dir", str(data_dir), "--tasks", SEEN, UNSEEN, "strategy_qa", "--max-examples", "3",
               "--max-new-tokens", "12", "--enforce-eager", "--out-dir", str(out), "--routes", *routes]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["route_order"] == [parse_route(r).label for r in routes]
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 6 * 9
    for label, result in report["routes"].items():
        for task, counts in result["tasks"].items():
            rows = [r for r in records if r["route"] == label and r["task"] == task]
            assert counts["n"] == 3
            assert score([r["prediction"] for r in rows], [r["gold"] for r in rows], task)["correct"] == counts["correct"]
    base = [r["prediction"] for r in records if r["route"] == "base"]
    expert = [r["prediction"] for r in records if r["route"] == f"expert:{SEEN}"]
    assert base != expert, "the expert's LoRA must change vLLM's greedy output"
    assert set(report["routes"]["task"]["adapters"]) == {f"expert-{SEEN}", f"expert-{UNSEEN}",
                                                         next(n for n in report["adapters"] if "exact" in n
                                                              and report["adapters"][n]["experts"] == {UNSEEN: 1.25,
                                                                                                       "gsm8k": -0.5})}
    assert "| **seen average** |" in proc.stdout


@pytest.fixture(scope="module")
def shared_bundle(tmp_path_factory, tiny_student) -> Path:
    """all_data as the shared adapter, two residual experts, a gate over the residuals, one composition."""
    root = tmp_path_factory.mktemp("shared") / "bundle"
    create_bundle(root, student_identity(tiny_student))
    for seed, name in enumerate(("all_data", "addsub", "gsm8k")):
        add_expert(root, name, random_adapter(tiny_student, r=4, seed=seed, std=0.3), name)
    set_shared(root, "all_data")
    set_gate(root, random_gate(["addsub", "gsm8k"], grid=0.25))
    add_composition(root, "svamp", {"addsub": 0.75, "gsm8k": 0.25}, "exact", "svamp")
    add_composition(root, "svamp-linear", {"addsub": 0.75, "gsm8k": 0.25}, "linear", "svamp")
    return root


def _same_delta(folder: Path, expected) -> None:
    built = load_adapter(folder)
    for path, (a, b) in expected.modules().items():
        torch.testing.assert_close(built.modules()[path][1] @ built.modules()[path][0], b @ a)


def test_every_adapter_route_of_a_shared_bundle_runs_on_top_of_the_shared_adapter(shared_bundle, tiny_student,
                                                                                    tmp_path):
    planner = _planner(shared_bundle, tiny_student, tmp_path / "cache")
    experts = load_bundle(shared_bundle).experts
    shared, addsub, gsm8k = (experts[n].load() for n in ("all_data", "addsub", "gsm8k"))

    (own,) = planner.plan(parse_route("expert:addsub"), ["p"], ["addsub"])
    assert dict(own.experts) == {"addsub": 1.0, "all_data": 1.0} and own.rank == 8
    _same_delta(own.path, compose_exact([shared, addsub], [1.0, 1.0]))

    (alone,) = planner.plan(parse_route("expert:all_data"), ["p"], ["addsub"])
    assert alone.path == shared_bundle / "experts" / "all_data", "the shared adapter alone is its own folder"

    (composed,) = planner.plan(parse_route("composition:svamp"), ["p"], ["svamp"])
    assert dict(composed.experts) == {"addsub": 0.75, "gsm8k": 0.25, "all_data": 1.0}
    _same_delta(composed.path, compose_exact([shared, addsub, gsm8k], [1.0, 0.75, 0.25]))

    (explicit,) = planner.plan(parse_route('mixture:{"gsm8k": 0.5}'), ["p"], ["gsm8k"])
    assert dict(explicit.experts) == {"gsm8k": 0.5, "all_data": 1.0}

    for choice in planner.plan(RouteSpec("gate"), ["What is 2 + 3?", "Take the last letters of a b"], ["x", "y"]):
        assert dict(choice.experts)["all_data"] == 1.0 and len(choice.experts) >= 2

    assert planner.plan(RouteSpec("base"), ["p"], ["x"]) == [None], "the bare student stays bare"
    (linear,) = planner.plan(parse_route("composition:svamp-linear"), ["p"], ["svamp"])
    assert dict(linear.experts) == {"addsub": 0.75, "gsm8k": 0.25, "all_data": 1.0}
    _same_delta(linear.path, compose_exact([shared, merge_linear([addsub, gsm8k], [0.75, 0.25])], [1.0, 1.0]))
    with pytest.raises(ConfigError, match="may not weigh the shared adapter"):
        add_composition(shared_bundle, "bad", {"addsub": 0.75, "all_data": 0.25}, "linear", "svamp")
