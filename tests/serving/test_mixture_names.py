"""Explicit mixtures named in `model` ("mode-cotd:mixture:{...}"), for clients that set no other field."""

from __future__ import annotations

import json

import pytest

from serving.errors import InvalidMixture, InvalidRequest, ModelNotFound

from .served import assert_openai_error, completion


def test_a_mixture_name_is_the_mixture_route(served):
    model = "mode-cotd:mixture:" + json.dumps({"alpha": 0.25, "beta": 0.75})
    route = served.routes.resolve(model)
    body_route = served.routes.resolve("mode-cotd", {"alpha": 0.25, "beta": 0.75})
    assert (route.kind, route.adapter, route.model) == ("mixture", body_route.adapter, model)
    assert served.routes.resolve("mode-cotd:mixture:alpha=0.25,beta=0.75").adapter == body_route.adapter
    assert served.routes.resolve("mode-cotd:alpha").kind == "expert"
    with pytest.raises(ModelNotFound):
        served.routes.resolve("other:mixture:{}")


@pytest.mark.parametrize("tail, error, words", [
    ('{"alpha": 0.5,', InvalidMixture, "not JSON"),
    ("alpha=0.5,beta", InvalidMixture, "expert=weight"),
    ("alpha=half", InvalidMixture, "expert=weight"),
    ("alpha=0.5,alpha=0.5", InvalidMixture, "each expert once"),
    ("[0.5, 0.5]", InvalidMixture, "expert=weight"),
    ('{"delta": 1}', InvalidMixture, "delta"),
    ('{"alpha": NaN}', InvalidMixture, "finite"),
])
def test_bad_mixture_names(served, tail, error, words):
    with pytest.raises(error, match=words):
        served.routes.resolve("mode-cotd:mixture:" + tail)


def test_a_mixture_in_both_model_and_body_is_refused(served):
    with pytest.raises(InvalidRequest, match="give it once"):
        served.routes.resolve('mode-cotd:mixture:{"alpha": 1}', {"alpha": 1})


def test_the_api_serves_a_mixture_name(served):
    model = 'mode-cotd:mixture:{"alpha": 0.5, "gamma": 0.5}'
    data = completion(served, model=model).json()
    assert data["model"] == model
    assert data["mode_cotd"]["route"] == "mixture" and data["mode_cotd"]["experts"] == {"alpha": 0.5, "gamma": 0.5}
    assert_openai_error(completion(served, model="mode-cotd:nothing"), 404, "model_not_found")
    assert_openai_error(completion(served, model='mode-cotd:mixture:{"alpha": 1}', mixture={"beta": 1}), 400)
