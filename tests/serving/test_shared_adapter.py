"""A bundle with a shared adapter (manifest.shared): every adapter route is served on top of it, exactly.

The tiny bundle's three experts are residuals over a fourth, "common"; the gate routes the three.
With the union, a route is a mixture id whose last block (common) has weight 1; without it, a
composite of route + common at weight 1. "mode-cotd:common" is the shared adapter alone.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from mode_cotd.adapter import load_adapter
from mode_cotd.bundle import add_composition, add_expert, create_bundle, set_gate, set_shared
from mode_cotd.errors import BundleError, ConfigError
from mode_cotd.student import student_identity
from mode_cotd.tiny import random_adapter, random_gate
from serving.fast_lora import mixture_ids
from serving.settings import EngineSettings

from .conftest import EXPERT_RANK, EXPERTS
from .served import Served, assert_openai_error, built, completion

SHARED = "common"


@pytest.fixture(scope="module")
def shared_bundle(tiny_student, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-bundle") / "residual"
    create_bundle(root, student_identity(tiny_student))
    for seed, name in enumerate((*EXPERTS, SHARED), start=1):
        add_expert(root, name, random_adapter(tiny_student, r=EXPERT_RANK, lora_alpha=16.0, seed=seed, std=0.3),
                   task=f"task_{name}")
    add_composition(root, "two", {"alpha": 0.5, "gamma": 0.5}, "exact", "task_two")
    set_gate(root, random_gate(EXPERTS, grid=0.25))
    set_shared(root, SHARED)
    return root


def _served(bundle, tiny_student, tmp_path, **engine) -> Served:
    s = Served(bundle, tiny_student, tmp_path, engine_settings=EngineSettings(**engine))
    asyncio.run(s.service.start())
    return s


def _deltas(adapter) -> dict[str, torch.Tensor]:
    """Module path -> ΔW = s·B·A [out, in], in float64 (the plain reference)."""
    return {p: adapter.scaling() * b.double() @ a.double() for p, (a, b) in adapter.modules().items()}


def _weights(s: Served) -> dict[str, float]:
    """Block weights of the last request's mixture id, by expert name."""
    code = mixture_ids.decode(s.engine.requests[-1][3].lora_id)
    assert isinstance(code, mixture_ids.MixtureCode) and code.layout.shared
    return dict(zip(s.service.cache.union.names, code.weights))


def test_every_adapter_route_is_a_mixture_id_over_the_shared_adapter(shared_bundle, tiny_student, tmp_path):
    s = _served(shared_bundle, tiny_student, tmp_path)
    union = s.service.cache.union
    assert union.names == (*EXPERTS, SHARED) and union.layout.shared
    assert [t.name for t in s.engine.pinned] == [f"expert-{n}" for n in union.names]
    for body, expected in (({"model": "mode-cotd:beta"}, {"beta": 1.0}),
                           ({"model": "mode-cotd", "mixture": {"alpha": 0.25, "gamma": 0.75}},
                            {"alpha": 0.25, "gamma": 0.75}),
                           ({"model": "mode-cotd:two"}, {"alpha": 0.5, "gamma": 0.5})):
        response = completion(s, **body)
        assert response.status_code == 200, response.text
        assert _weights(s) == {"alpha": 0.0, "beta": 0.0, "gamma": 0.0, **expected, SHARED: 1.0}, body
        assert response.json()["mode_cotd"]["experts"] == {**expected, SHARED: 1.0}, body  # what served it
    response = completion(s, model="mode-cotd")  # the gate: its top-2 mixture, on top of common
    assert response.status_code == 200
    assert response.json()["mode_cotd"]["experts"][SHARED] == 1.0
    weights = _weights(s)
    assert weights[SHARED] == 1.0 and sum(weights[e] for e in EXPERTS) == pytest.approx(1.0)
    assert built(s.service.cache) == []


def test_the_shared_adapter_alone_and_the_base_stay_themselves(shared_bundle, tiny_student, tmp_path):
    s = _served(shared_bundle, tiny_student, tmp_path)
    assert completion(s, model=f"mode-cotd:{SHARED}").status_code == 200
    code = mixture_ids.decode(s.engine.requests[-1][3].lora_id)
    assert isinstance(code, mixture_ids.MemberCode) and s.service.cache.union.names[code.index] == SHARED
    assert completion(s, model=s.student_name).status_code == 200
    assert s.engine.requests[-1][3] is None


def test_without_the_union_a_route_is_the_composite_of_it_and_the_shared_adapter(shared_bundle, tiny_student,
                                                                                  tmp_path):
    s = _served(shared_bundle, tiny_student, tmp_path, mixture_union=False)
    response = completion(s, model="mode-cotd:beta")
    assert response.status_code == 200, response.text
    lora = s.engine.requests[-1][3]
    assert lora.name.startswith("composite-exact-")
    composite = load_adapter(lora.path)
    beta, common = load_adapter(shared_bundle / "experts" / "beta"), load_adapter(shared_bundle / "experts" / SHARED)
    for path, expected in _deltas(beta).items():  # ΔW = ΔW_beta + ΔW_common, module by module
        torch.testing.assert_close(_deltas(composite)[path], expected + _deltas(common)[path], rtol=1e-5, atol=1e-6)
    assert completion(s, model=f"mode-cotd:{SHARED}").status_code == 200
    assert s.engine.requests[-1][3].path.endswith(SHARED)  # the shared adapter alone: its own folder


def test_models_list_the_shared_adapter_under_each_route(shared_bundle, tiny_student, tmp_path):
    s = _served(shared_bundle, tiny_student, tmp_path)
    models = {m["id"]: m for m in s.client.get("/v1/models").json()["data"]}
    assert models["mode-cotd:beta"]["mode_cotd"]["experts"] == {"beta": 1.0, SHARED: 1.0}
    assert models[f"mode-cotd:{SHARED}"]["mode_cotd"]["experts"] == {SHARED: 1.0}
    assert SHARED in models["mode-cotd"]["mode_cotd"]["candidates"]
    assert {m["mode_cotd"]["shared"] for i, m in models.items() if i.startswith("mode-cotd")} == {SHARED}
    assert [m["mode_cotd"]["shared"] for m in models.values() if m["mode_cotd"]["route"] == "base"] == [None]


def test_a_linear_composition_is_its_merge_plus_the_shared_adapter(shared_bundle, tiny_student, tmp_path):
    import json
    import shutil

    from mode_cotd.mixing import merge_linear

    root = tmp_path / "linear"
    shutil.copytree(shared_bundle, root)
    add_composition(root, "paper_mix", {"alpha": 0.6, "beta": 0.4}, "linear", "task_paper")
    s = _served(root, tiny_student, tmp_path)
    response = completion(s, model="mode-cotd:paper_mix")
    assert response.status_code == 200, response.text
    lora = s.engine.requests[-1][3]
    assert lora.name.startswith("composite-linear-")  # the union serves exact mixtures only
    alpha, beta, common = (load_adapter(root / "experts" / n) for n in ("alpha", "beta", SHARED))
    merged = merge_linear([alpha, beta], [0.6, 0.4])
    for path, expected in _deltas(merged).items():  # ΔW = ΔW_common + the paper's merge, module by module
        torch.testing.assert_close(_deltas(load_adapter(lora.path))[path], expected + _deltas(common)[path],
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="may not weigh the shared adapter 'common'"):
        add_composition(root, "bad", {"alpha": 0.6, SHARED: 0.4}, "linear", "task_paper")
    manifest = json.loads((root / "manifest.json").read_text())  # written by hand, past the writer's check
    manifest["compositions"]["bad"] = {**manifest["compositions"]["paper_mix"], "weights": {"alpha": 0.6,
                                                                                           SHARED: 0.4}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="'bad'.*may not weigh the shared adapter 'common'"):
        Served(root, tiny_student, tmp_path / "again")


def test_a_linear_spec_that_weighs_the_shared_adapter_is_refused(shared_bundle, tiny_student, tmp_path):
    from mode_cotd.mixture import Mixture
    from serving.errors import InvalidMixture
    from serving.protocol import AdapterSpec

    s = _served(shared_bundle, tiny_student, tmp_path)
    with pytest.raises(InvalidMixture, match="may not weigh the shared adapter"):
        s.service.cache.resolver.resolve(AdapterSpec(Mixture(("alpha", SHARED), (0.5, 0.5)), "linear"))
    assert s.service.cache.resolver.resolve(AdapterSpec(Mixture(("alpha", "beta"), (0.5, 0.5)), "linear")).outcome \
        == "composite"
    assert_openai_error(completion(s, model="mode-cotd", mixture={"nope": 1.0}), 400)
    assert completion(s, model="mode-cotd:alpha").status_code == 200


def test_a_gate_that_abstains_serves_the_shared_adapter_alone(shared_bundle, tiny_student, tmp_path):
    import shutil

    from mode_cotd.bundle import load_bundle

    root = tmp_path / "abstaining"
    shutil.copytree(shared_bundle, root)
    gate = load_bundle(root, student=tiny_student).gate
    gate.config.abstain_below, gate.config.abstain_to = 1.0, SHARED  # no top probability reaches 1: always
    set_gate(root, gate)
    s = _served(root, tiny_student, tmp_path)
    response = completion(s, model="mode-cotd")
    assert response.status_code == 200, response.text
    assert response.json()["mode_cotd"]["experts"] == {SHARED: 1.0}
    code = mixture_ids.decode(s.engine.requests[-1][3].lora_id)
    assert isinstance(code, mixture_ids.MemberCode) and s.service.cache.union.names[code.index] == SHARED
