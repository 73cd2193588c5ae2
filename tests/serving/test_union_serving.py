"""Mixtures through the union (serving/mixture_union.py) on the app with a fake engine.

The experts are pinned at start under member ids; a mixture on the grid that sums to 1 goes to
the engine as a mixture id over the placeholder adapter, with nothing built; other mixtures and
"linear" compositions still get composites.
"""

from __future__ import annotations

import asyncio

import pytest

from mode_cotd.errors import BundleError
from serving.fast_lora import mixture_ids
from serving.mixture_union import PLACEHOLDER
from serving.settings import EngineSettings

from .served import Served, built, completion


def _served(tiny_bundle, tiny_student, tmp_path, **engine) -> Served:
    s = Served(tiny_bundle, tiny_student, tmp_path, engine_settings=EngineSettings(**engine))
    asyncio.run(s.service.start())
    return s


def _last_lora(s: Served):
    return s.engine.requests[-1][3]


def test_experts_are_pinned_and_served_by_their_member_ids(tiny_bundle, tiny_student, tmp_path):
    s = _served(tiny_bundle, tiny_student, tmp_path)
    union = s.service.cache.union
    assert union is not None and [t.name for t in s.engine.pinned] == [f"expert-{n}" for n in union.names]
    assert completion(s, model="mode-cotd:beta").status_code == 200
    lora = _last_lora(s)
    code = mixture_ids.decode(lora.lora_id)
    assert isinstance(code, mixture_ids.MemberCode) and union.names[code.index] == "beta"
    assert lora.path.endswith("beta") and lora in s.engine.pinned


def test_a_mixture_is_a_mixture_id_and_builds_nothing(tiny_bundle, tiny_student, tmp_path):
    s = _served(tiny_bundle, tiny_student, tmp_path)
    names = s.service.cache.union.names
    response = completion(s, model="mode-cotd", mixture={"alpha": 0.25, "gamma": 0.75})
    assert response.status_code == 200, response.text
    lora = _last_lora(s)
    code = mixture_ids.decode(lora.lora_id)
    assert isinstance(code, mixture_ids.MixtureCode)
    assert dict(zip(names, code.weights)) == {n: {"alpha": 0.25, "gamma": 0.75}.get(n, 0.0) for n in names}
    assert lora.path.endswith(PLACEHOLDER) and built(s.service.cache) == []
    assert s.sample("mode_cotd_mixture_union_requests_total") == 1
    assert s.sample("mode_cotd_composite_cache_misses_total") == 0


def test_the_gate_routes_through_the_union(tiny_bundle, tiny_student, tmp_path):
    s = _served(tiny_bundle, tiny_student, tmp_path)
    assert completion(s, model="mode-cotd").status_code == 200
    code = mixture_ids.decode(_last_lora(s).lora_id)
    assert isinstance(code, (mixture_ids.MixtureCode, mixture_ids.MemberCode))  # top-2, or one expert at 1.0
    assert built(s.service.cache) == []


def test_mixtures_the_union_cannot_encode_still_get_composites(tiny_bundle, tiny_student, tmp_path):
    s = _served(tiny_bundle, tiny_student, tmp_path)
    for body in ({"model": "mode-cotd", "mixture": {"alpha": 1.5, "gamma": -0.5}},  # negative weight
                 {"model": "mode-cotd", "mixture": {"alpha": 1.0, "gamma": 1.0}},  # sums to 2
                 {"model": "mode-cotd:paper_mix"}):  # a "linear" composition
        response = completion(s, **body)
        assert response.status_code == 200, response.text
        assert _last_lora(s).name.startswith("composite-"), body
    assert s.sample("mode_cotd_composite_cache_misses_total") == 3


def test_union_off_serves_experts_from_their_folders(tiny_bundle, tiny_student, tmp_path):
    for engine in ({"mixture_union": False}, {"fast_lora": False}):
        s = _served(tiny_bundle, tiny_student, tmp_path / str(engine), **engine)
        assert s.service.cache.union is None and s.engine.pinned == []
        assert completion(s, model="mode-cotd", mixture={"alpha": 0.5, "gamma": 0.5}).status_code == 200
        assert _last_lora(s).name.startswith("composite-exact-")


def _experts(tiny_student, tmp_path, ranks: dict[str, int]) -> dict:
    from mode_cotd.adapter import save_adapter
    from mode_cotd.tiny import random_adapter

    return {name: save_adapter(random_adapter(tiny_student, r=r, seed=i), tmp_path / name)
            for i, (name, r) in enumerate(ranks.items())}


def test_experts_of_different_ranks_share_a_union_at_the_largest_rank(tiny_student, tmp_path, caplog):
    from serving.mixture_union import MixtureUnion

    experts = _experts(tiny_student, tmp_path, {"a": 4, "b": 8})
    union = MixtureUnion.for_experts(experts, tmp_path / "cache", 20, 16)
    assert (union.layout.experts, union.layout.block_rank) == (2, 8)  # a's block: 4 rows, then 4 zero rows
    assert MixtureUnion.for_experts(experts, tmp_path / "cache2", 20, 4) is None
    assert "over the engine's max LoRA rank 4" in caplog.text


def test_the_union_family_follows_the_expert_files(tiny_student, tmp_path):
    from mode_cotd.adapter import save_adapter
    from mode_cotd.tiny import random_adapter
    from serving.mixture_union import MixtureUnion

    experts = _experts(tiny_student, tmp_path, {"a": 4, "b": 4, "c": 4})
    union = MixtureUnion.for_experts(experts, tmp_path / "cache", 20, 16)
    assert (union.layout.experts, union.layout.block_rank) == (3, 4)
    assert MixtureUnion.for_experts(experts, tmp_path / "cache", 20, 16).layout == union.layout  # stable
    save_adapter(random_adapter(tiny_student, r=4, seed=99), experts["b"])  # b retrained: another union
    changed = MixtureUnion.for_experts(experts, tmp_path / "cache", 20, 16)
    assert changed.layout.family != union.layout.family  # 7 bits of a digest: deterministic for these seeds


def test_known_experts_are_not_read_again(tiny_student, tmp_path):
    from mode_cotd.adapter import WEIGHTS_NAME
    from serving.mixture_union import ExpertFacts, MixtureUnion

    experts = _experts(tiny_student, tmp_path, {"a": 4, "b": 8})
    read = {name: ExpertFacts.read(path) for name, path in experts.items()}
    union = MixtureUnion.for_experts(experts, tmp_path / "cache", 20, 16)
    assert MixtureUnion.for_experts(experts, tmp_path / "cache", 20, 16, known=read) == union  # the same union
    (experts["b"] / WEIGHTS_NAME).write_bytes(b"not read")  # known: its folder is not opened
    assert MixtureUnion.for_experts(experts, tmp_path / "cache", 20, 16, known={"b": read["b"]}) == union
    with pytest.raises(BundleError, match="unreadable safetensors"):  # unknown: read, and refused
        MixtureUnion.for_experts(experts, tmp_path / "cache", 20, 16, known={"a": read["a"]})


def test_paging_counts_reach_metrics_only_where_experts_are_paged(served):
    text = lambda: served.client.get("/metrics", headers=served.auth_headers).text
    assert "mode_cotd_expert_page_ins{" not in text()  # every expert pinned: no series
    served.engine.paging = {"experts_resident": 64, "expert_page_ins": 130, "expert_page_outs": 66}
    assert served.sample("mode_cotd_experts_resident") == 64
    assert served.sample("mode_cotd_expert_page_ins") == 130 and served.sample("mode_cotd_expert_page_outs") == 66
