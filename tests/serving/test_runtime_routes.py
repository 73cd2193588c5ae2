"""Runtime experts through the app (plain classes, fake engine): vLLM's load/unload endpoints, the state folder
shared by replicas and restarts, and every bad input a 4xx naming its field while the server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mode_cotd.adapter import save_adapter
from mode_cotd.mixture import Mixture
from mode_cotd.tiny import random_adapter
from serving.protocol import AdapterSpec, GenerationRequest, SamplingSettings
from serving.settings import RuntimeSettings

from .served import Served, assert_openai_error, completion


@pytest.fixture
def roots(tmp_path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    return folder


def write_expert(root: Path, name: str, student, r: int = 8, seed: int = 11, base: str | None = None) -> Path:
    adapter = random_adapter(student, r=r, lora_alpha=16.0, seed=seed, std=0.3)
    adapter.base_model_name_or_path = base
    return save_adapter(adapter, root / name)


def runtime_served(tiny_bundle, tiny_student, tmp_path, roots, **settings) -> Served:
    runtime = RuntimeSettings(enabled=True, state_dir=str(tmp_path / "state"), adapter_roots=[str(roots)], **settings)
    served = Served(tiny_bundle, tiny_student, tmp_path, runtime=runtime)
    served.engine.started = True
    return served


def load(served: Served, name: str, path) -> object:
    return served.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def test_runtime_endpoints_are_off_by_default(served, roots, tiny_student):
    path = write_expert(roots, "delta", tiny_student)
    assert load(served, "delta", path).status_code == 404
    assert served.client.post("/v1/compositions", json={"name": "x", "examples": []}).status_code == 404


def test_load_serve_mix_and_unload_an_expert(tiny_bundle, tiny_student, tmp_path, roots):
    served = runtime_served(tiny_bundle, tiny_student, tmp_path, roots)
    response = load(served, "mode-cotd:delta", write_expert(roots, "delta", tiny_student))
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'delta' added successfully."
    assert "mode-cotd:delta" in [m["id"] for m in served.client.get("/v1/models").json()["data"]]

    one = completion(served, model="mode-cotd:delta")
    assert one.status_code == 200, one.text
    assert one.json()["mode_cotd"]["adapter"].startswith("runtime-delta-")
    mixed = completion(served, model="mode-cotd", mixture={"alpha": 0.5, "delta": 0.5})
    assert mixed.status_code == 200, mixed.text
    assert mixed.json()["mode_cotd"]["experts"] == {"alpha": 0.5, "delta": 0.5}

    gone = served.client.post("/v1/unload_lora_adapter", json={"lora_name": "delta"})
    assert gone.status_code == 200 and gone.text == "Success: LoRA adapter 'delta' removed successfully."
    assert_openai_error(completion(served, model="mode-cotd:delta"), 404, "model_not_found")
    assert_openai_error(served.client.post("/v1/unload_lora_adapter", json={"lora_name": "delta"}), 404)
    assert completion(served, model="mode-cotd:alpha").status_code == 200


def test_loaded_again_with_new_weights_gets_a_new_lora(tiny_bundle, tiny_student, tmp_path, roots):
    served = runtime_served(tiny_bundle, tiny_student, tmp_path, roots)
    assert load(served, "delta", write_expert(roots, "one", tiny_student, seed=1)).status_code == 200
    first = completion(served, model="mode-cotd:delta").json()["mode_cotd"]["adapter"]
    served.client.post("/v1/unload_lora_adapter", json={"lora_name": "delta"})
    assert load(served, "delta", write_expert(roots, "two", tiny_student, seed=2)).status_code == 200
    second = completion(served, model="mode-cotd:delta").json()["mode_cotd"]["adapter"]
    assert first != second


def test_another_replica_and_a_restart_serve_what_was_loaded(tiny_bundle, tiny_student, tmp_path, roots):
    served = runtime_served(tiny_bundle, tiny_student, tmp_path, roots)
    assert load(served, "delta", write_expert(roots, "delta", tiny_student)).status_code == 200
    replica = runtime_served(tiny_bundle, tiny_student, tmp_path, roots)  # started after the load: a restart

    async def one_request():
        request = GenerationRequest("r1", [1, 2, 3], SamplingSettings(max_tokens=4), AdapterSpec(Mixture.one("delta")))
        return [event async for event in replica.service.generate(request)]

    import asyncio

    started = asyncio.run(one_request())[0]
    assert started.adapter.lora_name.startswith("runtime-delta-")
    assert completion(replica, model="mode-cotd:delta").status_code == 200


@pytest.mark.parametrize("case, status, param", [
    ("outside the roots", 400, "lora_path"),
    ("a pickle", 400, "lora_path"),
    ("a missing file", 400, "lora_path"),
    ("no such folder", 400, "lora_path"),
    ("another base model", 400, "lora_path"),
    ("rank over the engine's", 400, "lora_path"),
    ("a bundle route's name", 409, "lora_name"),
    ("a bad name", 400, "lora_name"),
    ("a taken name", 409, "lora_name"),
])
def test_bad_loads_are_refused_and_the_server_keeps_serving(tiny_bundle, tiny_student, tmp_path, roots,
                                                            case, status, param):
    served = runtime_served(tiny_bundle, tiny_student, tmp_path, roots)
    good = write_expert(roots, "good", tiny_student)
    name, path = "delta", good
    if case == "outside the roots":
        path = write_expert(tmp_path, "elsewhere", tiny_student)
    elif case == "a pickle":
        (roots / "good" / "adapter_model.bin").write_bytes(b"not loaded")
    elif case == "a missing file":
        (roots / "good" / "adapter_model.safetensors").unlink()
    elif case == "no such folder":
        path = roots / "nothing"
    elif case == "another base model":
        path = write_expert(roots, "other", tiny_student, base="org/other-model")
    elif case == "rank over the engine's":
        path = write_expert(roots, "big", tiny_student, r=64)
    elif case == "a bundle route's name":
        name = "alpha"
    elif case == "a bad name":
        name = "../up"
    elif case == "a taken name":
        assert load(served, "delta", write_expert(roots, "first", tiny_student)).status_code == 200
    error = assert_openai_error(load(served, name, path), status)
    assert error["param"] == param, error
    assert not list((tmp_path / "state" / "experts").glob("delta-*"))[int(case == "a taken name"):]
    assert completion(served, model="mode-cotd:alpha").status_code == 200


def test_an_unknown_expert_in_a_mixture_and_too_many_routes(tiny_bundle, tiny_student, tmp_path, roots):
    served = runtime_served(tiny_bundle, tiny_student, tmp_path, roots, max_routes=1)
    assert load(served, "delta", write_expert(roots, "delta", tiny_student)).status_code == 200
    error = assert_openai_error(load(served, "epsilon", write_expert(roots, "e", tiny_student)), 400)
    assert error["code"] == "too_many_routes"
    assert_openai_error(completion(served, model="mode-cotd", mixture={"alpha": 0.5, "zeta": 0.5}), 400,
                        "invalid_mixture")
    assert completion(served, model="mode-cotd", mixture={"alpha": 0.5, "delta": 0.5}).status_code == 200


def test_the_state_folder_is_beside_the_bundle_by_default(tiny_bundle, tiny_student, tmp_path, roots):
    runtime = RuntimeSettings(enabled=True, adapter_roots=[str(roots)])
    served = Served(tiny_bundle, tiny_student, tmp_path, runtime=runtime)
    served.engine.started = True
    try:
        assert load(served, "delta", write_expert(roots, "delta", tiny_student)).status_code == 200
        state = Path(str(tiny_bundle) + ".runtime")
        assert json.loads((state / "state.json").read_text())["experts"]["delta"]
        assert not (Path(tiny_bundle) / "state.json").exists()
    finally:
        import shutil

        shutil.rmtree(str(tiny_bundle) + ".runtime", ignore_errors=True)


def test_a_damaged_state_file_keeps_the_routes_last_read(tiny_bundle, tiny_student, tmp_path, roots):
    served = runtime_served(tiny_bundle, tiny_student, tmp_path, roots)
    assert load(served, "delta", write_expert(roots, "delta", tiny_student)).status_code == 200
    assert completion(served, model="mode-cotd:delta").status_code == 200
    (tmp_path / "state" / "state.json").write_text("{ not json")
    assert completion(served, model="mode-cotd:delta").status_code == 200
    assert completion(served, model="mode-cotd:alpha").status_code == 200
    assert "mode-cotd:delta" in [m["id"] for m in served.client.get("/v1/models").json()["data"]]


def test_a_hand_edited_state_cannot_take_a_bundle_experts_name(loaded_bundle, tmp_path):
    from serving.adapter_cache import AdapterCache
    from serving.adapter_resolver import RuntimeTarget

    experts = {name: entry.path for name, entry in loaded_bundle.experts.items()}
    cache = AdapterCache(experts, tmp_path / "c", 16, roots=[loaded_bundle.root])
    cache.resolver.set_runtime({"alpha": RuntimeTarget("runtime-alpha-0", str(tmp_path / "x"))}, tmp_path)
    assert cache.resolver.experts["alpha"] == experts["alpha"] and not cache.resolver.runtime
