"""PEFT adapter folders: round trip, refusals, and a composite that peft serves exactly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mode_cotd.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    LoraAdapter,
    adapter_from_modules,
    load_adapter,
    save_adapter,
)
from mode_cotd.checksums import file_checksums
from mode_cotd.errors import BundleError
from mode_cotd.mixing import compose_exact, delta_weight

PREFIX = "base_model.model.model.layers.0.self_attn."


def small_adapter(r: int = 4, seed: int = 0) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {
        PREFIX + n: (torch.randn(r, 16, generator=gen), torch.randn(8, r, generator=gen))
        for n in ("q_proj", "v_proj")
    }
    return adapter_from_modules(modules, r, 8.0, True, "tiny-student")


def write_folder(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    save_file(tensors, folder / WEIGHTS_NAME)
    return folder


@pytest.fixture(autouse=True)
def no_torch_load(monkeypatch):
    """Loading must never unpickle: any torch.load call fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


def test_save_load_round_trip(tmp_path):
    adapter = small_adapter()
    folder = save_adapter(adapter, tmp_path / "expert")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8.0, True)
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["rank_pattern"] == {}
    loaded = load_adapter(folder)
    assert (loaded.r, loaded.lora_alpha, loaded.use_rslora) == (4, 8.0, True)
    assert loaded.target_modules == ["q_proj", "v_proj"]
    assert loaded.base_model_name_or_path == "tiny-student"
    assert loaded.scaling() == pytest.approx(8.0 / 2.0)
    assert loaded.weights.keys() == adapter.weights.keys()
    for key, tensor in adapter.weights.items():
        torch.testing.assert_close(loaded.weights[key], tensor, rtol=0, atol=0)

    sums = file_checksums(folder)
    assert sums[WEIGHTS_NAME] == hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert sums == file_checksums(save_adapter(loaded, tmp_path / "again"))

    half = load_adapter(save_adapter(adapter, tmp_path / "bf16", dtype=torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in half.weights.values())


def test_failed_save_leaves_nothing(tmp_path):
    adapter = small_adapter()
    adapter.r = 3  # the tensors have rank 4
    with pytest.raises(BundleError, match="rank must be r=3"):
        save_adapter(adapter, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_pickled_weights_are_refused(tmp_path):
    folder = save_adapter(small_adapter(), tmp_path / "expert")
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.bin")
    with pytest.raises(BundleError, match=r"adapter_model\.bin: pickled weights are refused"):
        load_adapter(folder)


def test_broken_folders_name_the_file(tmp_path):
    a, b = torch.randn(4, 16), torch.randn(8, 4)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    key = PREFIX + "q_proj"

    folder = write_folder(
        tmp_path / "mismatch", config, {key + ".lora_A.weight": a, key + ".lora_B.weight": torch.randn(8, 3)}
    )
    with pytest.raises(BundleError, match=rf"{WEIGHTS_NAME}.*does not fit lora_A"):
        load_adapter(folder)

    folder = write_folder(
        tmp_path / "rank", {**config, "r": 2}, {key + ".lora_A.weight": a, key + ".lora_B.weight": b}
    )
    with pytest.raises(BundleError, match=r"has rank 4 but .*adapter_config\.json says 2"):
        load_adapter(folder)

    folder = write_folder(tmp_path / "half", config, {key + ".lora_A.weight": a})
    with pytest.raises(BundleError, match="lacks its lora_B"):
        load_adapter(folder)

    folder = write_folder(tmp_path / "json", config, {key + ".lora_A.weight": a, key + ".lora_B.weight": b})
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(BundleError, match=rf"{CONFIG_NAME}: unreadable JSON"):
        load_adapter(folder)
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(BundleError, match=rf"{CONFIG_NAME}: missing"):
        load_adapter(folder)

    folder = write_folder(
        tmp_path / "noweights", config, {key + ".lora_A.weight": a, key + ".lora_B.weight": b}
    )
    (folder / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(BundleError, match=rf"{WEIGHTS_NAME}: unreadable safetensors"):
        load_adapter(folder)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(BundleError, match=rf"{WEIGHTS_NAME}: missing"):
        load_adapter(folder)


def test_rank_pattern_is_padded_to_one_rank(tmp_path):
    q, v = PREFIX + "q_proj", PREFIX + "v_proj"
    tensors = {
        q + ".lora_A.weight": torch.randn(4, 16),
        q + ".lora_B.weight": torch.randn(8, 4),
        v + ".lora_A.weight": torch.randn(2, 16),
        v + ".lora_B.weight": torch.randn(8, 2),
    }
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": False,
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"v_proj": 2},
        "alpha_pattern": {"v_proj": 6},
    }
    loaded = load_adapter(write_folder(tmp_path / "pattern", config, tensors))
    assert loaded.r == 4 and all(a.shape[0] == b.shape[1] == 4 for a, b in loaded.modules().values())
    torch.testing.assert_close(
        delta_weight(loaded, q), 2.0 * tensors[q + ".lora_B.weight"] @ tensors[q + ".lora_A.weight"]
    )
    torch.testing.assert_close(
        delta_weight(loaded, v), 3.0 * tensors[v + ".lora_B.weight"] @ tensors[v + ".lora_A.weight"]
    )


def _peft_expert(student: Path, folder: Path, seed: int, **lora_kwargs) -> dict[str, torch.Tensor]:
    """Train-free expert: random non-zero B, saved by peft. Returns module name -> peft's own ΔW."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(student), LoraConfig(task_type="CAUSAL_LM", **lora_kwargs)
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    base = model.get_base_model()
    return {
        n: m.get_delta_weight("default").detach().clone()
        for n, m in base.named_modules()
        if isinstance(m, LoraLayer)
    }


def test_composite_loaded_by_peft_matches_merged_reference(tiny_student, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    deltas_1 = _peft_expert(
        tiny_student, tmp_path / "e1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    deltas_2 = _peft_expert(
        tiny_student,
        tmp_path / "e2",
        seed=2,
        r=2,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["v_proj", "o_proj", "down_proj"],
        rank_pattern={"o_proj": 3},
        alpha_pattern={"down_proj": 5},
    )
    experts = [load_adapter(tmp_path / "e1"), load_adapter(tmp_path / "e2")]
    assert experts[1].r == 3
    weights = [0.7, -0.4]
    composite = compose_exact(experts, weights)
    save_adapter(composite, tmp_path / "mix")
    assert json.loads((tmp_path / "mix" / CONFIG_NAME).read_text())["r"] == 7

    ids = torch.tensor([[1, 40, 77, 120, 9, 200, 33, 5, 61, 99]])
    reference = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    with torch.no_grad():
        base_logits = reference(ids).logits
        for name in sorted(deltas_1.keys() | deltas_2.keys()):
            delta = sum(w * d[name] for w, d in zip(weights, (deltas_1, deltas_2)) if name in d)  # [out, in]
            reference.get_submodule(name).weight += delta
        want = reference(ids).logits  # [1, T, V]
        served = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_student), tmp_path / "mix"
        ).eval()
        got = served(ids).logits
    assert (want - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad, dtype):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    tensors = {PREFIX + f"{m}.lora_{x}.weight": torch.randn(*shape).to(dtype)
               for m in ("q_proj", "v_proj") for x, shape in (("A", (4, 16)), ("B", (8, 4)))}
    folder = write_folder(tmp_path / "fine", config, tensors)
    assert load_adapter(folder).r == 4
    tensors[PREFIX + "v_proj.lora_B.weight"][5, 2] = bad
    folder = write_folder(tmp_path / "bad", config, tensors)
    with pytest.raises(BundleError, match=r"v_proj\.lora_B\.weight has non-finite values"):
        load_adapter(folder)
