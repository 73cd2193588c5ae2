"""Routes: model name and explicit mixture -> route kind and adapter."""

from __future__ import annotations

import math

import pytest

from mode_cotd.mixture import Mixture
from serving.errors import InvalidMixture, InvalidRequest, ModelNotFound
from serving.protocol import AdapterSpec
from serving.routes import RouteTable


@pytest.fixture
def table(loaded_bundle) -> RouteTable:
    return RouteTable.from_bundle(loaded_bundle, "tiny-student", "mode-cotd", default_grid=0.05)


def test_each_route_kind(table):
    assert table.resolve("mode-cotd").kind == "gate"
    assert table.resolve("mode-cotd").adapter is None

    expert = table.resolve("mode-cotd:beta")
    assert (expert.kind, expert.name) == ("expert", "beta")
    assert expert.adapter == AdapterSpec(Mixture(("beta",), (1.0,)))
    assert expert.adapter.single_expert() == "beta"

    comp = table.resolve("mode-cotd:all_three")
    assert (comp.kind, comp.name, comp.adapter.mode) == ("composition", "all_three", "exact")
    assert comp.adapter.mixture.as_dict() == {"alpha": 0.5, "beta": 0.3, "gamma": 0.2}
    assert comp.adapter.single_expert() is None
    assert table.resolve("mode-cotd:paper_mix").adapter.mode == "linear"

    base = table.resolve("tiny-student")
    assert (base.kind, base.adapter) == ("base", None)

    mixed = table.resolve("mode-cotd", {"gamma": 0.5, "alpha": 0.5})
    assert mixed.kind == "mixture"
    assert mixed.adapter.mixture == Mixture(("alpha", "gamma"), (0.5, 0.5))


def test_explicit_mixture_rounds_to_the_gate_grid_and_keeps_signs(table):
    assert table.grid == 0.25
    key = table.resolve("mode-cotd", {"alpha": 0.6, "beta": -0.4}).adapter.mixture
    assert key.as_dict() == {"alpha": 0.5, "beta": -0.5}
    assert table.resolve("mode-cotd", {"alpha": 1}).adapter.single_expert() == "alpha"


def test_prefixed_names(table):
    assert table.resolve("mode-cotd:expert:alpha").kind == "expert"
    assert table.resolve("mode-cotd:composition:all_three").kind == "composition"
    with pytest.raises(ModelNotFound):
        table.resolve("mode-cotd:composition:alpha")


@pytest.mark.parametrize("model", ["gpt-4", "mode-cotd:", "mode-cotd:delta", "mode-cotd:expert:", "MODE-COTD"])
def test_unknown_models_are_404(table, model):
    with pytest.raises(ModelNotFound) as info:
        table.resolve(model)
    assert info.value.status == 404 and info.value.param == "model"
    assert "mode-cotd:alpha" in info.value.message


@pytest.mark.parametrize(
    "mixture, match",
    [
        ({"delta": 1.0}, "unknown expert"),
        ({"alpha": math.nan}, "finite"),
        ({"alpha": math.inf, "beta": 1.0}, "finite"),
        ({"alpha": -math.inf}, "finite"),
        ({"alpha": "heavy"}, "finite number"),
        ({}, "non-empty"),
        ({"alpha": 0.01}, "no weight left"),
        ({"bad name!": 1.0}, "not a valid name"),
    ],
)
def test_bad_mixtures_are_400(table, mixture, match):
    with pytest.raises(InvalidMixture, match=match) as info:
        table.resolve("mode-cotd", mixture)
    assert info.value.status == 400 and info.value.param == "mixture"


def test_mixture_needs_the_gate_model(table):
    with pytest.raises(InvalidRequest, match="only accepted with model"):
        table.resolve("mode-cotd:alpha", {"alpha": 1.0})


def test_models_lists_every_route(table):
    rows = {m.id: m for m in table.models()}
    assert list(rows) == ["mode-cotd", "mode-cotd:alpha", "mode-cotd:beta", "mode-cotd:gamma",
                          "mode-cotd:all_three", "mode-cotd:paper_mix", "tiny-student"]
    assert rows["mode-cotd"].kind == "gate" and rows["mode-cotd"].candidates == ["alpha", "beta", "gamma"]
    assert rows["mode-cotd:paper_mix"].experts == {"alpha": 0.6, "beta": 0.4}
    assert rows["tiny-student"].kind == "base"


def test_name_clash_between_expert_and_composition(table):
    table.compositions["alpha"] = AdapterSpec(Mixture(("beta",), (0.5,)))
    assert table.resolve("mode-cotd:alpha").kind == "expert"
    assert table.resolve("mode-cotd:composition:alpha").kind == "composition"
    assert "mode-cotd:composition:alpha" in table.model_ids()


def test_without_a_gate_the_gate_route_is_404_but_mixtures_work(table):
    table.gate_experts = None
    with pytest.raises(ModelNotFound, match="no"):
        table.resolve("mode-cotd")
    assert "mode-cotd" not in table.model_ids()
    assert table.resolve("mode-cotd", {"alpha": 0.5, "beta": 0.5}).kind == "mixture"
